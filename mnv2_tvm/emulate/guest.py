"""The measuring process that runs INSIDE the emulated core (qemu-user + the mnv2cost plugin).

Standard library, NumPy and the TVM *runtime* only; it never imports the rest of the package
(it runs as a script, under the board's or the guest's own python3). Long-lived: it imports TVM
once (~15-20 s under qemu) and then answers JSON requests, one per line on stdin, with one JSON
line on stdout. Every measurement runs in a child forked from this idle process (see Guest):

    {"op": "ping"}
    {"op": "measure", "lib": PATH, "func": NAME, "args": [{"shape": [...], "dtype": "float32"}, ...],
     "warmup": 1, "tag": N}                      # one function of a library (a tuning candidate)
    {"op": "measure_vm", "lib": PATH, "inputs": [...], "warmup": 1, "tag": N}   # a Relax VM's main
    {"op": "measure_engine", "engine": "onnxruntime"|"ncnn", "model": PATH, "input": {"shape": [...]},
     "threads": 1, "site": DIR, "warmup": 1, "tag": N}   # another engine's inference (peers.py)
    {"op": "exit"}

Around the measured call it opens windows with the plugin (a syscall number no kernel uses):
``warmup`` runs in a window that only simulates caches (the first one empties them), then one
counting window. Before that it tells the plugin which code to instrument: the executable
mapping of the library, libc's memcpy/memset/memmove, and the address of
TVMBackendParallelLaunch (each call starts a parallel region). The plugin writes its record to
a file the host reads; this process only says the window is closed.

A candidate that crashes kills only its child: the reply says so and the next request works.
(If this process itself dies, the host restarts it.)
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import sys
import time
import traceback

MNV2_SYSCALL = 0x6D6E76
OP_HELLO, OP_RANGE_CLEAR, OP_RANGE_ADD, OP_SET_LAUNCH, OP_COMMIT, OP_OPEN, OP_CLOSE = range(1, 8)
FLAG_COUNT, FLAG_RESET = 1, 2
RANGE_NO_MEMORY, RANGE_PLT, RANGE_GATED = 1, 2, 4
WRAPPER_PREFIX = b"__tvm_ffi_"
PAGE = 4096
MAX_RANGES = 16  # the plugin's MAXRANGES
LIBC_FUNCTIONS = ("memcpy", "memmove", "memset")


class Plugin:
    """The guest's half of the window protocol."""

    def __init__(self) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self._syscall = self.libc.syscall
        self._syscall.restype = ctypes.c_long

    def call(self, op: int, a: int = 0, b: int = 0, c: int = 0) -> None:
        self._syscall(ctypes.c_long(MNV2_SYSCALL), ctypes.c_long(op), ctypes.c_ulong(a), ctypes.c_ulong(b),
                      ctypes.c_ulong(c))

    def instrument(self, ranges: list[tuple[int, int, int]], launch: int) -> None:
        """Instrument these (start, end, flags) ranges from now on; translations are redone if they changed."""
        self.call(OP_RANGE_CLEAR)
        for start, end, flags in ranges:
            self.call(OP_RANGE_ADD, start, end, flags)
        self.call(OP_SET_LAUNCH, launch)
        self.call(OP_COMMIT)


def read_maps() -> list[tuple[int, int, str, int, str]]:
    out = []
    with open("/proc/self/maps") as fh:
        for line in fh:
            parts = line.split(None, 5)
            if len(parts) < 5:
                continue
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            path = parts[5].strip() if len(parts) > 5 else ""
            out.append((lo, hi, parts[1], int(parts[2], 16), path))
    return out


def same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def library_ranges(path: str) -> list[tuple[int, int, int]]:
    """What to instrument of a loaded library: its executable mappings, with the packed-call
    wrappers (``__tvm_ffi_<name>``: argument unpacking) counted but not cache-simulated, and its
    PLT marked (the plugin then counts libc's memcpy/memset only when the library calls them)."""
    real = os.path.realpath(path)
    maps = [m for m in read_maps() if m[4] and (m[4] == real or same_file(m[4], real))]
    if not maps:
        return []
    # The load bias; the executable segments come from the ELF file, because qemu's
    # /proc/self/maps does not always show guest code as executable (x86-64 guests on x86-64).
    base = min(lo - off for lo, _, _, off, _ in maps)
    ranges = [(base + vaddr, base + vaddr + size, 0) for vaddr, size in elf_exec_segments(real)]
    for value, size in elf_functions(real, WRAPPER_PREFIX):
        ranges.append((base + value, base + value + size, RANGE_NO_MEMORY))
    for addr, size in elf_sections(real, b".plt"):
        ranges.append((base + addr, base + addr + size, RANGE_PLT))
    return ranges


def elf_exec_segments(path: str) -> list[tuple[int, int]]:
    """(vaddr, memsz) of an ELF64 file's executable PT_LOAD segments."""
    with open(path, "rb") as fh:
        data = fh.read(1 << 16)
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return []
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    out = []
    for i in range(phnum):
        p_type, p_flags, _, p_vaddr, _, _, p_memsz = struct.unpack_from("<IIQQQQQ", data, phoff + i * phentsize)
        if p_type == 1 and p_flags & 1:  # PT_LOAD, PF_X
            out.append((p_vaddr, p_memsz))
    return out


def _section_headers(data: bytes) -> list[tuple]:
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    return [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)], shstrndx


def elf_sections(path: str, prefix: bytes) -> list[tuple[int, int]]:
    """(address, size) of the allocated sections named prefix* (.plt, .plt.sec, .plt.got)."""
    with open(path, "rb") as fh:
        data = fh.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return []
    sections, shstrndx = _section_headers(data)
    names_off = sections[shstrndx][4]
    out = []
    for sh_name, _, _, sh_addr, _, sh_size, *_ in sections:
        end = data.index(b"\0", names_off + sh_name)
        if data[names_off + sh_name:end].startswith(prefix) and sh_addr and sh_size:
            out.append((sh_addr, sh_size))
    return out


def elf_functions(path: str, prefix: bytes) -> list[tuple[int, int]]:
    """(value, size) of the functions named prefix* in an ELF64 file's .dynsym and .symtab."""
    with open(path, "rb") as fh:
        data = fh.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return []
    sections, _ = _section_headers(data)
    found = set()
    for _, sh_type, _, _, sh_offset, sh_size, sh_link, _, _, sh_entsize in sections:
        if sh_type not in (2, 11) or sh_entsize != 24:  # SHT_SYMTAB, SHT_DYNSYM
            continue
        str_off = sections[sh_link][4]
        for k in range(sh_size // 24):
            st_name, st_info, _, _, st_value, st_size = struct.unpack_from("<IBBHQQ", data, sh_offset + k * 24)
            if st_info & 0xF != 2 or st_size == 0:  # STT_FUNC
                continue
            end = data.index(b"\0", str_off + st_name)
            if data[str_off + st_name:end].startswith(prefix):
                found.add((st_value, st_size))
    return sorted(found)


def elf_plt_slots(path: str, names: tuple[str, ...]) -> dict[str, int]:
    """name -> offset (from the load bias) of the GOT slot its PLT entry jumps through, for the
    functions of ``names`` this ELF64 file imports (its R_AARCH64_JUMP_SLOT / R_X86_64_JUMP_SLOT
    relocations)."""
    with open(path, "rb") as fh:
        data = fh.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return {}
    sections, _ = _section_headers(data)
    wanted = {n.encode() for n in names}
    out = {}
    for _, sh_type, _, _, sh_offset, sh_size, sh_link, _, _, sh_entsize in sections:
        if sh_type != 4 or sh_entsize != 24 or sh_link >= len(sections):  # SHT_RELA
            continue
        symtab = sections[sh_link]
        if symtab[1] != 11:  # relocations against .dynsym only
            continue
        str_off = sections[symtab[6]][4]
        for k in range(sh_size // 24):
            r_offset, r_info, _ = struct.unpack_from("<QQq", data, sh_offset + k * 24)
            if r_info & 0xFFFFFFFF not in (1026, 7):  # JUMP_SLOT on aarch64, x86-64
                continue
            st_name, = struct.unpack_from("<I", data, symtab[4] + (r_info >> 32) * 24)
            end = data.index(b"\0", str_off + st_name)
            name = data[str_off + st_name:end]
            if name in wanted:
                out[name.decode()] = r_offset
    return out


def _read_encoded(buf: bytes, pos: int, enc: int, base: int) -> tuple[int, int]:
    """A DWARF-encoded pointer of the forms .eh_frame_hdr uses in practice (4/8-byte, abs/pc/data-rel)."""
    fmt = enc & 0x0F
    if fmt == 0x03:
        val, size = struct.unpack_from("<I", buf, pos)[0], 4
    elif fmt == 0x0B:
        val, size = struct.unpack_from("<i", buf, pos)[0], 4
    elif fmt in (0x04, 0x0C, 0x00):
        val, size = struct.unpack_from("<q" if fmt == 0x0C else "<Q", buf, pos)[0], 8
    else:
        raise ValueError(f"pointer encoding {enc:#x}")
    app = enc & 0x70
    if app == 0x10:  # pc-relative
        val += base + pos
    elif app == 0x30:  # data-relative (to the start of .eh_frame_hdr)
        val += base
    elif app != 0x00:
        raise ValueError(f"pointer application {enc:#x}")
    return val, pos + size


def function_extent(addr: int) -> tuple[int, int] | None:
    """[start, end) of the function containing addr, from its library's .eh_frame_hdr table.

    Shared libraries on Debian are stripped of .symtab, but every function with unwind
    information (glibc's assembler string functions included) has an entry in the sorted
    .eh_frame_hdr search table: the next entry's start bounds the function.
    """
    maps = read_maps()
    owner = next((m for m in maps if m[0] <= addr < m[1] and m[4].startswith("/")), None)
    if owner is None:
        return None
    path = owner[4]
    base = min(lo - off for lo, _, _, off, p in maps if p == path)
    with open(path, "rb") as fh:
        data = fh.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    hdr = None
    for i in range(phnum):
        p_type, _, p_offset, p_vaddr = struct.unpack_from("<IIQQ", data, phoff + i * phentsize)
        if p_type == 0x6474E550:  # PT_GNU_EH_FRAME
            hdr = (p_offset, p_vaddr)
    if hdr is None:
        return None
    off, vaddr = hdr
    buf = data[off:]
    _, ptr_enc, count_enc, table_enc = struct.unpack_from("<BBBB", buf, 0)
    pos = 4
    try:
        _, pos = _read_encoded(buf, pos, ptr_enc, 0)
        count, pos = _read_encoded(buf, pos, count_enc, 0)
        starts = []
        for _ in range(count):
            loc, pos = _read_encoded(buf, pos, table_enc, 0)
            _, pos = _read_encoded(buf, pos, table_enc, 0)
            starts.append(loc)
    except (ValueError, struct.error):
        return None
    # Data-relative entries are relative to .eh_frame_hdr's own address.
    if table_enc & 0x70 == 0x30:
        starts = [s + vaddr for s in starts]
    rel = addr - base
    starts.sort()
    import bisect

    i = bisect.bisect_right(starts, rel) - 1
    if i < 0 or i + 1 >= len(starts):
        return None
    return base + starts[i], base + starts[i + 1]


class Guest:
    """The long-lived parent: imports TVM once, then forks one child per request.

    Each measurement runs in a child forked from the same idle parent, so it starts from the
    same process state (heap, allocator pools, thread pool: none yet) whatever was measured
    before: costs do not depend on history, and a candidate that crashes only kills its child.
    """

    def __init__(self) -> None:
        t0 = time.perf_counter()
        import numpy as np  # noqa: F401
        import tvm
        from tvm.runtime.vm import VirtualMachine

        self.np = np
        self.tvm = tvm
        self.VirtualMachine = VirtualMachine
        self.dev = tvm.cpu(0)
        self.plugin = Plugin()
        self.plugin.call(OP_HELLO)
        self.libc_ranges = self._libc_ranges()
        self.runtime_launch = self._runtime_launch()
        self.import_s = time.perf_counter() - t0

    def _libc_ranges(self) -> list[tuple[int, int, int]]:
        ranges = []
        for name in LIBC_FUNCTIONS:
            try:
                addr = ctypes.cast(getattr(self.plugin.libc, name), ctypes.c_void_p).value
                ext = function_extent(addr) if addr else None
            except (AttributeError, OSError, ValueError):
                ext = None
            if ext and (*ext, RANGE_GATED) not in ranges and ext[1] - ext[0] < (1 << 16):
                ranges.append((*ext, RANGE_GATED))
        return ranges

    def _runtime_launch(self) -> int:
        for lo, hi, perms, _, path in read_maps():
            if path.endswith("libtvm_runtime.so"):
                try:
                    lib = ctypes.CDLL(path, mode=getattr(os, "RTLD_NOLOAD", 4))
                    return ctypes.cast(lib.TVMBackendParallelLaunch, ctypes.c_void_p).value or 0
                except (OSError, AttributeError):
                    return 0
        return 0

    def _launch_of(self, lib_path: str) -> int:
        """What the library really calls for a parallel launch (its context pointer)."""
        try:
            lib = ctypes.CDLL(lib_path, mode=getattr(os, "RTLD_NOLOAD", 4))
            return ctypes.c_void_p.in_dll(lib, "__TVMBackendParallelLaunch").value or self.runtime_launch
        except (OSError, ValueError):
            return self.runtime_launch

    def arg(self, spec: dict, index: int):
        """A deterministic, page-aligned argument (its page offset never depends on history)."""
        import mmap

        np = self.np
        shape = tuple(int(d) for d in spec["shape"])
        dtype = np.dtype(spec.get("dtype", "float32"))
        n = int(np.prod(shape, dtype=np.int64)) if shape else 1
        nbytes = max(n * dtype.itemsize, 1)
        # One readable page more than the data: some generated kernels read a vector past the
        # end of an argument (MetaSchedule candidates of the classifier and the depthwise convs
        # do), harmless on a real heap where the next page is mapped, a SIGSEGV here if the
        # next page happens to be unmapped. Never touched otherwise, so no cost.
        buf = mmap.mmap(-1, (nbytes + PAGE - 1) // PAGE * PAGE + PAGE)
        a = np.frombuffer(buf, dtype=dtype, count=n).reshape(shape)
        i = np.arange(n, dtype=np.int64).reshape(shape)
        h = (i * 2654435761 + 97 * (index + 1)) % 1009
        if dtype.kind == "f":
            a[...] = (h.astype(np.float64) / 1009.0 - 0.5).astype(dtype)
        elif dtype.kind in "iu":
            a[...] = (h % 7).astype(dtype)
        elif dtype.kind == "b":
            a[...] = (h % 2).astype(dtype)
        else:
            raise ValueError(f"unsupported dtype {dtype}")
        return self.tvm.runtime.from_dlpack(a), buf, a

    def _windows(self, fn, warmup: int, tag: int) -> dict:
        p = self.plugin
        t0 = time.perf_counter()
        for i in range(warmup):
            p.call(OP_OPEN, FLAG_RESET if i == 0 else 0)
            fn()
            p.call(OP_CLOSE, tag)
        t1 = time.perf_counter()
        p.call(OP_OPEN, FLAG_COUNT | (0 if warmup else FLAG_RESET))
        fn()
        p.call(OP_CLOSE, tag)
        t2 = time.perf_counter()
        return {"ok": True, "tag": tag, "warmup_s": t1 - t0, "count_s": t2 - t1}

    def _load(self, path: str):
        real = os.path.realpath(path)
        lib = self.tvm.runtime.load_module(real)
        self.plugin.instrument(library_ranges(real) + self.libc_ranges, self._launch_of(real))
        return lib

    def measure(self, req: dict) -> dict:
        lib = self._load(req["lib"])
        fn = lib[req["func"]]
        held = [self.arg(spec, i) for i, spec in enumerate(req["args"])]
        args = [h[0] for h in held]
        reply = self._windows(lambda: fn(*args), int(req.get("warmup", 1)), int(req["tag"]))
        if req.get("return_output"):
            reply["outputs"] = [h[2].tolist() for h in held]
        return reply

    def measure_vm(self, req: dict) -> dict:
        lib = self._load(req["lib"])
        vm = self.VirtualMachine(lib, self.dev)
        main = vm[req.get("func", "main")]
        held = [self.arg(spec, i) for i, spec in enumerate(req["inputs"])]
        args = [h[0] for h in held]
        out: list = []
        reply = self._windows(lambda: out.append(main(*args)), int(req.get("warmup", 1)), int(req["tag"]))
        res = out[-1]
        if hasattr(res, "numpy"):
            arr = res.numpy()
            reply["output"] = {"shape": list(arr.shape), "sum": float(arr.astype("float64").sum())}
        return reply

    def measure_engine(self, req: dict) -> dict:
        """One inference of another engine (ONNX Runtime, ncnn) on the same deterministic input
        as ``measure_vm``'s, counting that engine's own code.

        The engine is imported here, in the forked child, so the long-lived parent stays as it is
        for TVM requests. What is instrumented is the executable mappings of the engine's own
        shared objects (found in /proc/self/maps once it is loaded), their PLTs, and libc's
        memcpy/memset/memmove called from them: the same rule as for a TVM library. There is no
        parallel-launch address: the thread pools of these engines are not visible to the plugin,
        so only a single-threaded inference is a sound measurement (``threads`` must be 1).
        """
        engine = req["engine"]
        self._main_thread_parked()
        threads = int(req.get("threads", 1))
        if threads != 1:
            raise ValueError(f"{engine} runs with 1 thread here: its thread pool's parallel regions are not "
                             f"visible to the plugin (only TVMBackendParallelLaunch is)")
        if req.get("site"):
            sys.path.insert(0, req["site"])
        model = os.path.realpath(req["model"])
        held = self.arg(req["input"], 0)
        x = held[2]
        out: list = []
        if engine == "onnxruntime":
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = 1
            so.inter_op_num_threads = 1
            so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
            feed = {sess.get_inputs()[0].name: x}
            version = ort.__version__
            fn = lambda: out.append(sess.run(None, feed))  # noqa: E731
            owned = ("/onnxruntime/capi/",)
        elif engine == "ncnn":
            import ncnn

            net = ncnn.Net()
            opt = net.opt
            opt.num_threads = 1
            # fp32 end to end, as the other engines: no fp16/bf16 storage or arithmetic, no int8.
            for name in ("use_fp16_packed", "use_fp16_storage", "use_fp16_arithmetic", "use_bf16_storage",
                         "use_int8_inference", "use_int8_storage", "use_int8_arithmetic", "use_int8_packed",
                         "use_vulkan_compute"):
                if hasattr(opt, name):
                    setattr(opt, name, False)
            if net.load_param(model) != 0 or net.load_model(os.path.splitext(model)[0] + ".bin") != 0:
                raise ValueError(f"ncnn could not load {model} and its .bin")
            in_name, out_names = net.input_names()[0], list(net.output_names())
            mat = ncnn.Mat(self.np.ascontiguousarray(x[0]))  # ncnn blobs are CHW (batch 1)
            version = ncnn.__version__

            def fn() -> None:
                ex = net.create_extractor()
                ex.input(in_name, mat)
                res = []
                for name in out_names:
                    ret, m = ex.extract(name)
                    if ret != 0:
                        raise RuntimeError(f"ncnn extract({name}) returned {ret}")
                    res.append(self.np.array(m))
                out.append(res)
            owned = ("/ncnn/", "/ncnn.libs/")
        else:
            raise ValueError(f"unknown engine {engine!r} (onnxruntime, ncnn)")
        libs = sorted({m[4] for m in read_maps()
                       if m[4].endswith(".so") or ".so." in os.path.basename(m[4])
                       if any(o in m[4] for o in owned)})
        self._deterministic_clocks(libs)
        ranges = [r for lib in libs for r in library_ranges(lib)]
        if not ranges:
            raise ValueError(f"no shared object of {engine} found mapped in this process")
        if len(ranges) + len(self.libc_ranges) > MAX_RANGES:
            raise ValueError(f"{engine} needs {len(ranges) + len(self.libc_ranges)} instrumented ranges; the plugin "
                             f"takes {MAX_RANGES}")
        self.plugin.instrument(ranges + self.libc_ranges, 0)
        reply = self._windows(fn, int(req.get("warmup", 1)), int(req["tag"]))
        arrays = [self.np.asarray(a) for a in out[-1]]
        reply.update(engine=engine, version=version, libraries=libs, ranges=len(ranges) + len(self.libc_ranges),
                     outputs=[{"shape": list(a.shape), "sum": float(a.astype("float64").sum())} for a in arrays])
        return reply

    @staticmethod
    def _main_thread_parked(timeout_s: float = 60.0) -> None:
        """Wait until the child's main thread is blocked joining this one.

        It starts this thread and then joins it, running Python code concurrently with this
        thread's first steps for as long as the interpreter's switch interval lets it: how far it
        got changes where later small objects are allocated, and the engines' Python bindings
        touch such objects inside the window (TVM's libraries never touch Python objects).
        """
        import threading

        main = threading.main_thread().ident
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            time.sleep(0.05)
            frame = sys._current_frames().get(main)
            if frame is not None and frame.f_code.co_name == "_wait_for_tstate_lock":
                return
        raise RuntimeError("the measuring child's main thread did not reach join()")

    def _deterministic_clocks(self, libs: list[str]) -> None:
        """Point the libraries' imports of clock functions at a counter (1 us a call).

        ONNX Runtime reads the time of day in every run and keeps statistics in a hash map keyed
        by it: whether the counting run lands in the warm-up's time bucket decides a node
        allocation, which moves later heap blocks and so the simulated cache's misses. Under
        emulation the host's clock means nothing; a counter makes those branches the same in
        every run. The callbacks are not instrumented code, so they add no counts.
        """
        tick = [1_700_000_000 * 10**9]

        def now() -> int:
            tick[0] += 1000
            return tick[0]

        class TimeSpec(ctypes.Structure):
            _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]

        def clock_gettime(_clock: int, ts) -> int:
            t = now()
            if ts:
                ts[0].sec, ts[0].nsec = divmod(t, 10**9)
            return 0

        def gettimeofday(tv, _tz) -> int:
            t = now()
            if tv:
                tv[0].sec, tv[0].nsec = t // 10**9, t % 10**9 // 1000
            return 0

        def time_(out) -> int:
            t = now() // 10**9
            if out:
                out[0] = t
            return t

        chrono = ctypes.CFUNCTYPE(ctypes.c_int64)(now)
        callbacks = {
            "_ZNSt6chrono3_V212system_clock3nowEv": chrono,
            "_ZNSt6chrono3_V212steady_clock3nowEv": chrono,
            "clock_gettime": ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.POINTER(TimeSpec))(clock_gettime),
            "gettimeofday": ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(TimeSpec), ctypes.c_void_p)(gettimeofday),
            "time": ctypes.CFUNCTYPE(ctypes.c_long, ctypes.POINTER(ctypes.c_long))(time_),
        }
        self._clock_callbacks = callbacks  # kept alive as long as the libraries may call them
        libc = self.plugin.libc
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        maps = read_maps()
        for lib in libs:
            slots = elf_plt_slots(lib, tuple(callbacks))
            if not slots:
                continue
            base = min(lo - off for lo, _, _, off, path in maps if path == lib)
            for name, offset in slots.items():
                addr = base + offset
                page = addr & ~(PAGE - 1)
                if libc.mprotect(page, PAGE, 3) != 0:  # RELRO: PROT_READ | PROT_WRITE
                    raise OSError(ctypes.get_errno(), f"mprotect of {lib}'s GOT failed")
                ctypes.c_void_p.from_address(addr).value = ctypes.cast(callbacks[name], ctypes.c_void_p).value

    def _configure_threads(self) -> None:
        """Use TVM_NUM_THREADS threads whatever the host has: TVM sizes its pool by the cores it
        sees (the host's, under qemu), so the pool of this thread is set explicitly."""
        threads = int(os.environ.get("TVM_NUM_THREADS", "1") or 1)
        if threads > 1:
            self.tvm.get_global_func("runtime.config_threadpool")(1, threads)  # 1: kBig

    def handle(self, req: dict) -> dict:
        self._configure_threads()
        op = req.get("op")
        if op == "measure":
            return self.measure(req)
        if op == "measure_vm":
            return self.measure_vm(req)
        if op == "measure_engine":
            return self.measure_engine(req)
        if op == "crash":  # for tests of the recovery path: a candidate that aborts
            os.abort()
        if op == "hang":  # ... and one that never returns
            while True:
                time.sleep(3600)
        raise ValueError(f"unknown op {op!r}")

    def run_forked(self, req: dict) -> dict:
        """Handle one request in a child process; a crash or a hang is a failed reply."""
        timeout = float(req.get("timeout_s", 600))
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            os.close(rfd)
            # The measurement runs in a new thread: glibc gives it a fresh malloc arena, so where
            # the runtime puts small buffers (a model's constants) does not depend on what the
            # long-lived parent allocated before this request.
            box: dict = {}

            def work() -> None:
                try:
                    box["reply"] = self.handle(req)
                except Exception as e:  # noqa: BLE001 - a failed candidate, reported as one line
                    traceback.print_exc(file=sys.stderr)
                    box["reply"] = {"ok": False, "error": f"{type(e).__name__}: {e}"}

            import threading

            worker = threading.Thread(target=work, name="measure")
            worker.start()
            worker.join()
            reply = box.get("reply", {"ok": False, "error": "the measuring thread ended without a result"})
            data = (json.dumps(reply) + "\n").encode()
            while data:
                data = data[os.write(wfd, data):]
            os._exit(0)
        os.close(wfd)
        import select

        chunks = []
        deadline = time.monotonic() + timeout
        timed_out = False
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            ready, _, _ = select.select([rfd], [], [], min(left, 5.0))
            if not ready:
                continue
            chunk = os.read(rfd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
        os.close(rfd)
        if timed_out:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        _, status = os.waitpid(pid, 0)
        text = b"".join(chunks).decode(errors="replace").strip()
        if text and not timed_out:
            return json.loads(text.splitlines()[-1])
        if timed_out:
            return {"ok": False, "error": f"the candidate did not finish within {timeout:.0f} s (emulated)"}
        if os.WIFSIGNALED(status):
            import signal

            sig = os.WTERMSIG(status)
            try:
                name = signal.Signals(sig).name
            except ValueError:
                name = f"signal {sig}"
            return {"ok": False, "error": f"the candidate crashed under emulation (killed by {name})",
                    "crashed": True}
        return {"ok": False, "error": f"the measuring child exited with status {os.WEXITSTATUS(status)} "
                                      f"without a reply", "crashed": True}


def main() -> int:
    # The protocol owns the real stdout; anything else printing (C or Python) goes to stderr.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        guest = Guest()
    except Exception as e:  # noqa: BLE001 - reported to the host as one line
        proto.write(json.dumps({"ok": False, "ready": False, "error": f"{type(e).__name__}: {e}"}) + "\n")
        return 1
    proto.write(json.dumps({"ok": True, "ready": True, "pid": os.getpid(), "import_s": guest.import_s,
                            "libc_ranges": guest.libc_ranges, "launch": guest.runtime_launch}) + "\n")
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            req = json.loads(line)
            op = req.get("op")
            if op == "exit":
                proto.write(json.dumps({"ok": True, "bye": True}) + "\n")
                return 0
            if op == "ping":
                reply = {"ok": True, "pid": os.getpid()}
            else:
                reply = guest.run_forked(req)
        except Exception as e:  # noqa: BLE001 - a failed request, not a dead process
            traceback.print_exc(file=sys.stderr)
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        reply.setdefault("tag", req.get("tag") if isinstance(req, dict) else None)
        proto.write(json.dumps(reply) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
