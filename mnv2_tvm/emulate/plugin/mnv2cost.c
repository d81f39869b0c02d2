/*
 * mnv2cost: a QEMU TCG plugin (plugin API v1, QEMU 7.2) that measures what a chosen piece of
 * guest code executes, deterministically, for the emulated-core cost of mnv2_tvm.emulate.
 *
 * - Counting happens only inside windows the guest opens and closes with a syscall number no
 *   kernel uses (MNV2_SYSCALL, called through ctypes: syscall(NR, op, a, b, c)). A warm-up
 *   window simulates the caches without counting; a counting window follows.
 * - Only code inside address ranges the guest registers (the candidate library's text, libc's
 *   memcpy/memset) is instrumented, at translation time: start-up and the TVM runtime (thread
 *   pool spin-waiting included) are neither counted nor cache-simulated. A range can be
 *   count-only (the library's packed-call wrappers: they read argument metadata from heap
 *   objects whose placement depends on what ran before). Shared code (libc's memcpy) is
 *   counted only when the library calls it through its PLT (see RANGE_GATED).
 * - Instructions retired are counted by class, classified once per instruction at translation
 *   time from the disassembly (aarch64 and x86-64 mnemonics).
 * - Every data access of that code goes through a per-thread, set-associative, LRU,
 *   write-back/write-allocate, non-inclusive cache hierarchy (up to 3 levels; no memory
 *   callbacks on branches, see on_tb_trans; DC ZVA zeroing is invisible). Shared levels
 *   are modelled as per-thread slices (the host passes slice sizes), so results do not depend
 *   on how the host interleaves the emulated threads.
 * - Cache indexing uses pseudo-physical addresses: each 4 KiB virtual page gets the next frame
 *   number the first time a thread touches it after a cache reset, so costs do not depend on
 *   where memory happens to be mapped (page offsets, which real caches see, are kept).
 * - Work is attributed to parallel regions: when the guest passes the address of
 *   TVMBackendParallelLaunch, every call to it (inside a window) starts a new region; each
 *   thread's work goes to the region current when it runs. The runtime's barrier at the end of
 *   a launch makes this sound. Region 0 is the serial code before the first launch.
 * - Per thread and region, every instrumented translation block's executions are counted too,
 *   and the edges between consecutive instrumented blocks ("blocks": [region, id, executions];
 *   "edges": [region, previous id, id, count], previous id NO_BLOCK at a window's start); the
 *   record carries each executed block's address and disassembly ("tbs": id -> [pc, text]).
 *   The host costs a block with a scheduling model of the core (llvm-mca: ports, widths,
 *   dependency chains) and finds loops and their trip counts from the backward edges.
 * - Results are appended, one JSON object per line, to the file named by the out= argument
 *   when a counting window closes (API v1 cannot write guest memory).
 *
 * Arguments: out=PATH (required), l1=SIZE:ASSOC, l2=SIZE:ASSOC, l3=SIZE:ASSOC (bytes; absent
 * levels are not simulated), line=64, dump=PATH (a debugging aid: each instrumented
 * instruction's class at translation, and per counting window the accesses per instruction and
 * the page map).
 *
 * Own code of the mnv2-tvm project, written against include/qemu/qemu-plugin.h.
 */
#include <glib.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ctype.h>

#include <qemu-plugin.h>

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

#define MNV2_SYSCALL 0x6d6e76 /* "mnv": far above any Linux syscall number */
#define MNV2_PROTOCOL 1

enum op {
    OP_HELLO = 1,        /* write a hello line (the guest checks the plugin is there) */
    OP_RANGE_CLEAR = 2,  /* forget the pending ranges */
    OP_RANGE_ADD = 3,    /* a = start, b = end, c = RANGE_* flags: instrument [start, end) */
    OP_SET_LAUNCH = 4,   /* a = address of TVMBackendParallelLaunch (0: none) */
    OP_COMMIT = 5,       /* pending ranges/launch become active; flush translations if changed */
    OP_OPEN = 6,         /* a = flags (FLAG_COUNT, FLAG_RESET) */
    OP_CLOSE = 7,        /* a = tag written with the record */
};
#define FLAG_COUNT 1u /* count (otherwise only simulate caches: a warm-up window) */
#define FLAG_RESET 2u /* empty the caches and the page map first */
#define RANGE_NO_MEMORY 1u /* count instructions only: no cache simulation (takes precedence) */
#define RANGE_PLT 2u       /* the library's PLT: executing it opens the thread's gate */
#define RANGE_GATED 4u     /* shared code (libc's memcpy...): counted only while the gate is open */
/*
 * The gate tells the library's own calls of a shared function from everybody else's: a PLT
 * stub of the library opens it, any other code of the library closes it. So memcpy counts
 * when the candidate calls it through its PLT, not when Python or the runtime do.
 */
enum kind { K_NONE, K_COUNT_ONLY, K_FULL, K_PLT, K_GATED };

/* Instruction classes: exclusive, they sum to the instructions retired. */
enum cls { C_INT, C_FP, C_VEC, C_FMA, C_LOAD, C_STORE, C_VLOAD, C_VSTORE, C_BRANCH, C_OTHER, NCLS };
static const char *cls_names[NCLS] = {"int", "fp", "vec", "fma", "load", "store",
                                      "vload", "vstore", "branch", "other"};
/* Per-region statistics of one thread. */
enum {
    S_LDOPS = NCLS,  /* load register transfers (an ldp of two registers: 2; x86 memory source: 1) */
    S_STOPS,         /* store register transfers */
    S_V64,           /* vector arithmetic work in 64-bit lanes units (Q-form/xmm 2, ymm 4, zmm 8) */
    NTB,             /* fields counted per translation block */
    S_LDACC = NTB,   /* data accesses as QEMU performs them (wide ones split in 8-byte pieces) */
    S_STACC,
    S_LDBYTES,
    S_STBYTES,
    S_LEVEL0,        /* then per level: ACC, MISS, SEQ, WB, STMISS */
};
enum { L_ACC, L_MISS, L_SEQ, L_WB, L_STMISS, NLF };
#define MAXLEVELS 3
#define NSTAT (S_LEVEL0 + NLF * MAXLEVELS)
static const char *level_field_names[NLF] = {"acc", "miss", "seq", "wb", "stmiss"};

#define MAXVCPUS 1024
#define MAXRANGES 16
#define RECENT 16

typedef struct {
    uint64_t *tags; /* sets * assoc entries, most recently used first; (line << 1) | dirty */
    uint32_t sets, assoc;
    uint64_t recent[RECENT]; /* last missed lines, for sequential-miss detection */
    uint32_t rpos;
} Cache;

typedef struct {
    uint64_t *keys, *vals;
    size_t cap, n;
} Map;

typedef struct {
    uint64_t window_seen, epoch_seen;
    bool gate;
    uint64_t *stats; /* regions * NSTAT */
    size_t cap, used;
    uint64_t scratch[NSTAT];
    /* page map: virtual page -> pseudo-physical frame, first-touch order */
    uint64_t *pm_keys, *pm_vals;
    size_t pm_cap, pm_n;
    uint64_t next_frame, last_vpn, last_pfn;
    /* in the current window: block executions, (region << 32 | block id) -> count, and edges,
     * (region << 48 | previous id << 24 | id) -> count */
    Map blocks, edges;
    uint64_t last_tb;
    Cache c[MAXLEVELS];
} VCPU;

typedef struct {
    uint64_t v[NTB];
    int kind;
    uint32_t id;   /* g_tb_id_base + index in g_tbinfos */
    uint64_t pc;   /* of its first instrumented instruction */
    GString *text; /* the instrumented instructions' disassembly, one per line */
} TBInfo;

static qemu_plugin_id_t g_id;
static const char *g_target = "";
static bool g_x86;
static FILE *g_out;
static FILE *g_dump;
/* Per-instruction data of instrumented instructions (their memory callbacks' udata). */
typedef struct {
    uint64_t vaddr;
    bool gated;
    uint64_t accesses; /* in counting windows, only kept with dump= (a debugging aid) */
} InsnInfo;
static GPtrArray *g_insninfos;
static int g_levels;
static uint64_t g_level_size[MAXLEVELS];
static uint32_t g_level_assoc[MAXLEVELS];
static uint32_t g_line_shift = 6;
static const uint32_t g_page_shift = 12;

static _Atomic(VCPU *) g_vcpus[MAXVCPUS];
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;

/* Active (used at translation) and pending (set by the guest) instrumentation. */
static uint64_t g_ranges[MAXRANGES][3], g_pending[MAXRANGES][3];
static int g_nranges, g_npending;
static uint64_t g_launch, g_pending_launch;
static GPtrArray *g_tbinfos;
static uint64_t g_tbs_instrumented;
static uint32_t g_tb_id_base; /* ids stay unique across resets of g_tbinfos */

/* Window state: written by the thread making the syscall, read by all. */
static atomic_bool g_open;
static atomic_bool g_counting;
static atomic_uint_fast64_t g_window;
static atomic_uint_fast64_t g_epoch;
static atomic_uint_fast64_t g_region;

/* ------------------------------------------------------------------ caches */

static void cache_init(Cache *c, uint64_t size, uint32_t assoc)
{
    uint64_t lines = size >> g_line_shift;
    c->assoc = assoc;
    c->sets = (uint32_t)(lines / assoc);
    if (c->sets == 0) {
        c->sets = 1;
    }
    c->tags = g_new(uint64_t, (size_t)c->sets * assoc);
}

static void cache_reset(Cache *c)
{
    memset(c->tags, 0xff, sizeof(uint64_t) * c->sets * c->assoc);
    memset(c->recent, 0xff, sizeof(c->recent));
    c->rpos = 0;
}

#define INVALID UINT64_MAX

/*
 * Look a line up; on a miss install it as most recently used. Returns true on a hit. The
 * victim, if valid and dirty, is reported through *wb_line (INVALID otherwise).
 */
static bool cache_access(Cache *c, uint64_t line, bool dirty, uint64_t *wb_line)
{
    uint64_t *set = c->tags + (size_t)(line % c->sets) * c->assoc;
    uint32_t a = c->assoc, i;
    *wb_line = INVALID;
    for (i = 0; i < a; i++) {
        uint64_t t = set[i];
        if (t != INVALID && (t >> 1) == line) {
            uint64_t nt = t | (dirty ? 1 : 0);
            memmove(set + 1, set, sizeof(uint64_t) * i);
            set[0] = nt;
            return true;
        }
    }
    uint64_t victim = set[a - 1];
    if (victim != INVALID && (victim & 1)) {
        *wb_line = victim >> 1;
    }
    memmove(set + 1, set, sizeof(uint64_t) * (a - 1));
    set[0] = (line << 1) | (dirty ? 1 : 0);
    return false;
}

/*
 * A miss is "predictable" when it continues a pattern a hardware prefetcher follows: the next
 * or previous line(s) of a recent miss, or a constant stride through recent misses, within one
 * 4 KiB page (prefetchers do not cross pages). The core model charges these less.
 */
static bool cache_note_miss(Cache *c, uint64_t line)
{
    const uint64_t page_lines_shift = g_page_shift - g_line_shift;
    const uint64_t page = line >> page_lines_shift;
    bool seq = false;
    for (int i = 0; i < RECENT && !seq; i++) {
        uint64_t r = c->recent[i];
        if (r == INVALID || r == line || (r >> page_lines_shift) != page) {
            continue;
        }
        int64_t d = (int64_t)(line - r);
        if (d >= -2 && d <= 2) {
            seq = true;
            break;
        }
        uint64_t prev = r - (uint64_t)d; /* r - d: the miss before r on the same stride */
        if ((prev >> page_lines_shift) != page) {
            continue;
        }
        for (int j = 0; j < RECENT; j++) {
            if (c->recent[j] == prev) {
                seq = true;
                break;
            }
        }
    }
    c->recent[c->rpos] = line;
    c->rpos = (c->rpos + 1) % RECENT;
    return seq;
}

/* A dirty line leaves level l: it is written into level l+1 (or to memory after the last). */
static void writeback(VCPU *v, uint64_t *st, int l, uint64_t line)
{
    st[S_LEVEL0 + NLF * l + L_WB]++;
    if (l + 1 < g_levels) {
        uint64_t wb;
        cache_access(&v->c[l + 1], line, true, &wb);
        if (wb != INVALID) {
            writeback(v, st, l + 1, wb);
        }
    }
}

static void access_line(VCPU *v, uint64_t *st, uint64_t line, bool store)
{
    for (int l = 0; l < g_levels; l++) {
        uint64_t *lv = st + S_LEVEL0 + NLF * l;
        uint64_t wb;
        lv[L_ACC]++;
        bool hit = cache_access(&v->c[l], line, store && l == 0, &wb);
        if (wb != INVALID) {
            writeback(v, st, l, wb);
        }
        if (hit) {
            return;
        }
        lv[L_MISS]++;
        if (store) {
            lv[L_STMISS]++;
        }
        if (cache_note_miss(&v->c[l], line)) {
            lv[L_SEQ]++;
        }
    }
}

/* ------------------------------------------------------------------ page map */

static void pm_clear(VCPU *v)
{
    if (v->pm_keys) {
        memset(v->pm_keys, 0xff, sizeof(uint64_t) * v->pm_cap);
    }
    v->pm_n = 0;
    v->next_frame = 0;
    v->last_vpn = INVALID;
}

static inline size_t pm_hash(uint64_t vpn, size_t cap)
{
    return (size_t)((vpn * 0x9E3779B97F4A7C15ull) >> 20) & (cap - 1);
}

static void pm_grow(VCPU *v)
{
    size_t old_cap = v->pm_cap, cap = old_cap ? old_cap * 2 : 4096;
    uint64_t *ok = v->pm_keys, *ov = v->pm_vals;
    v->pm_keys = g_new(uint64_t, cap);
    v->pm_vals = g_new(uint64_t, cap);
    memset(v->pm_keys, 0xff, sizeof(uint64_t) * cap);
    v->pm_cap = cap;
    for (size_t i = 0; i < old_cap; i++) {
        if (ok[i] != INVALID) {
            size_t h = pm_hash(ok[i], cap);
            while (v->pm_keys[h] != INVALID) {
                h = (h + 1) & (cap - 1);
            }
            v->pm_keys[h] = ok[i];
            v->pm_vals[h] = ov[i];
        }
    }
    g_free(ok);
    g_free(ov);
}

static uint64_t pm_frame(VCPU *v, uint64_t vpn)
{
    if (vpn == v->last_vpn) {
        return v->last_pfn;
    }
    if (2 * (v->pm_n + 1) > v->pm_cap) {
        pm_grow(v);
    }
    size_t h = pm_hash(vpn, v->pm_cap);
    while (v->pm_keys[h] != INVALID && v->pm_keys[h] != vpn) {
        h = (h + 1) & (v->pm_cap - 1);
    }
    if (v->pm_keys[h] == INVALID) {
        v->pm_keys[h] = vpn;
        v->pm_vals[h] = v->next_frame++;
        v->pm_n++;
    }
    v->last_vpn = vpn;
    v->last_pfn = v->pm_vals[h];
    return v->last_pfn;
}

/* ------------------------------------------------------------------ block counts */

#define NO_BLOCK 0xffffffu /* the previous block of a window's first: none */

static void map_clear(Map *m)
{
    if (m->keys) {
        memset(m->keys, 0xff, sizeof(uint64_t) * m->cap);
    }
    m->n = 0;
}

static void map_add(Map *m, uint64_t key)
{
    if (2 * (m->n + 1) > m->cap) {
        size_t old_cap = m->cap, cap = old_cap ? old_cap * 2 : 1024;
        uint64_t *ok = m->keys, *ov = m->vals;
        m->keys = g_new(uint64_t, cap);
        m->vals = g_new(uint64_t, cap);
        memset(m->keys, 0xff, sizeof(uint64_t) * cap);
        m->cap = cap;
        for (size_t i = 0; i < old_cap; i++) {
            if (ok[i] != INVALID) {
                size_t h = pm_hash(ok[i], cap);
                while (m->keys[h] != INVALID) {
                    h = (h + 1) & (cap - 1);
                }
                m->keys[h] = ok[i];
                m->vals[h] = ov[i];
            }
        }
        g_free(ok);
        g_free(ov);
    }
    size_t h = pm_hash(key, m->cap);
    while (m->keys[h] != INVALID && m->keys[h] != key) {
        h = (h + 1) & (m->cap - 1);
    }
    if (m->keys[h] == INVALID) {
        m->keys[h] = key;
        m->vals[h] = 0;
        m->n++;
    }
    m->vals[h]++;
}

static void bc_clear(VCPU *v)
{
    map_clear(&v->blocks);
    map_clear(&v->edges);
    v->last_tb = NO_BLOCK;
}

/* ------------------------------------------------------------------ per-vCPU state */

static VCPU *vcpu_get(unsigned int idx)
{
    if (idx >= MAXVCPUS) {
        return NULL;
    }
    VCPU *v = atomic_load_explicit(&g_vcpus[idx], memory_order_acquire);
    if (v) {
        return v;
    }
    pthread_mutex_lock(&g_lock);
    v = atomic_load_explicit(&g_vcpus[idx], memory_order_relaxed);
    if (!v) {
        v = g_new0(VCPU, 1);
        for (int l = 0; l < g_levels; l++) {
            cache_init(&v->c[l], g_level_size[l], g_level_assoc[l]);
            cache_reset(&v->c[l]);
        }
        pm_clear(v);
        v->window_seen = UINT64_MAX;
        v->epoch_seen = UINT64_MAX;
        atomic_store_explicit(&g_vcpus[idx], v, memory_order_release);
    }
    pthread_mutex_unlock(&g_lock);
    return v;
}

/* Bring a vCPU's state up to the current window (lazily, by the vCPU itself: no races). */
static inline void vcpu_sync(VCPU *v)
{
    uint64_t w = atomic_load_explicit(&g_window, memory_order_acquire);
    if (v->window_seen == w) {
        return;
    }
    uint64_t e = atomic_load_explicit(&g_epoch, memory_order_acquire);
    if (v->epoch_seen != e) {
        for (int l = 0; l < g_levels; l++) {
            cache_reset(&v->c[l]);
        }
        pm_clear(v);
        v->epoch_seen = e;
    }
    v->used = 0;
    bc_clear(v);
    v->gate = false;
    v->window_seen = w;
}

static inline uint64_t *vcpu_stats(VCPU *v)
{
    if (!atomic_load_explicit(&g_counting, memory_order_relaxed)) {
        return v->scratch;
    }
    size_t r = (size_t)atomic_load_explicit(&g_region, memory_order_relaxed);
    if (r >= v->cap) {
        size_t cap = v->cap ? v->cap : 64;
        while (cap <= r) {
            cap *= 2;
        }
        v->stats = g_renew(uint64_t, v->stats, cap * NSTAT);
        v->cap = cap;
    }
    if (r >= v->used) {
        memset(v->stats + v->used * NSTAT, 0, sizeof(uint64_t) * NSTAT * (r + 1 - v->used));
        v->used = r + 1;
    }
    return v->stats + r * NSTAT;
}

/* ------------------------------------------------------------------ execution callbacks */

static void on_tb_exec(unsigned int vcpu_index, void *udata)
{
    if (!atomic_load_explicit(&g_open, memory_order_acquire)) {
        return;
    }
    VCPU *v = vcpu_get(vcpu_index);
    if (!v) {
        return;
    }
    vcpu_sync(v);
    const TBInfo *t = udata;
    if (t->kind == K_GATED) {
        if (!v->gate) {
            return;
        }
    } else {
        v->gate = t->kind == K_PLT;
    }
    if (!atomic_load_explicit(&g_counting, memory_order_acquire)) {
        return;
    }
    uint64_t *st = vcpu_stats(v);
    for (int i = 0; i < NTB; i++) {
        st[i] += t->v[i];
    }
    uint64_t region = atomic_load_explicit(&g_region, memory_order_relaxed);
    map_add(&v->blocks, (region << 32) | t->id);
    map_add(&v->edges, (region << 48) | ((v->last_tb & NO_BLOCK) << 24) | (t->id & NO_BLOCK));
    v->last_tb = t->id;
}

static void on_mem(unsigned int vcpu_index, qemu_plugin_meminfo_t info, uint64_t vaddr, void *udata)
{
    if (!atomic_load_explicit(&g_open, memory_order_acquire)) {
        return;
    }
    VCPU *v = vcpu_get(vcpu_index);
    const InsnInfo *ii = udata;
    if (!v || (ii->gated && !v->gate)) {
        return;
    }
    vcpu_sync(v);
    uint64_t *st = vcpu_stats(v);
    if (g_dump && atomic_load_explicit(&g_counting, memory_order_relaxed)) {
        ((InsnInfo *)udata)->accesses++;
    }
    unsigned size = 1u << qemu_plugin_mem_size_shift(info);
    bool store = qemu_plugin_mem_is_store(info);
    st[store ? S_STACC : S_LDACC]++;
    st[store ? S_STBYTES : S_LDBYTES] += size;
    uint64_t first = vaddr >> g_line_shift, last = (vaddr + size - 1) >> g_line_shift;
    for (uint64_t vl = first; vl <= last; vl++) {
        uint64_t va = vl << g_line_shift;
        uint64_t pfn = pm_frame(v, va >> g_page_shift);
        uint64_t line = (pfn << (g_page_shift - g_line_shift)) |
                        ((va >> g_line_shift) & ((1u << (g_page_shift - g_line_shift)) - 1));
        access_line(v, st, line, store);
    }
}

static void on_launch(unsigned int vcpu_index, void *udata)
{
    if (atomic_load_explicit(&g_open, memory_order_acquire)) {
        atomic_fetch_add_explicit(&g_region, 1, memory_order_acq_rel);
    }
}

/* ------------------------------------------------------------------ classification */

static bool starts(const char *s, const char *p)
{
    return strncmp(s, p, strlen(p)) == 0;
}

static bool in_list(const char *m, const char *const *list)
{
    for (; *list; list++) {
        if (strcmp(m, *list) == 0) {
            return true;
        }
    }
    return false;
}

/* Vector arrangement of an aarch64 operand string: 128, 64 or 0 bits. */
static int a64_vector_bits(const char *ops)
{
    for (const char *p = ops; *p; p++) {
        if (*p == 'v' && (p == ops || !isalnum((unsigned char)p[-1])) && isdigit((unsigned char)p[1])) {
            const char *q = p + 1;
            while (isdigit((unsigned char)*q)) {
                q++;
            }
            if (*q != '.') {
                continue;
            }
            q++;
            int n = 0;
            while (isdigit((unsigned char)*q)) {
                n = n * 10 + (*q++ - '0');
            }
            int esz = *q == 'b' ? 8 : *q == 'h' ? 16 : *q == 's' ? 32 : *q == 'd' ? 64 : 0;
            if (n == 0) {
                return 128; /* element access, e.g. v2.s[1]: treat as a full register */
            }
            return n * esz >= 128 ? 128 : 64;
        }
    }
    return 0;
}

/* First register token of an operand string ("q0", "{v0.4s", "x1", ...). */
static char a64_first_reg_kind(const char *ops, int *nregs)
{
    while (*ops == ' ') {
        ops++;
    }
    *nregs = 1;
    if (*ops == '{') {
        int n = 0;
        const char *end = strchr(ops, '}');
        for (const char *p = ops; *p && (!end || p < end); p++) {
            if (*p == 'v' && isdigit((unsigned char)p[1])) {
                n++;
            }
        }
        /* "{v0.4s - v3.4s}" style ranges */
        const char *dash = strstr(ops, " - ");
        if (dash && (!end || dash < end)) {
            int a = atoi(ops + 2), b = atoi(dash + 4);
            n = b >= a ? b - a + 1 : 32 - a + b + 1;
        }
        *nregs = n ? n : 1;
        return 'v';
    }
    return *ops;
}

static const char *const a64_other[] = {"nop", "hint", "dmb", "dsb", "isb", "svc", "hvc", "smc", "brk", "hlt",
                                        "mrs", "msr", "yield", "wfe", "wfi", "sev", "sevl", "prfm", "prfum",
                                        "clrex", "paciasp", "autiasp", "pacibsp", "autibsp", "bti", "xpaclri",
                                        "udf", "sys", "sysl", "dc", "ic", "tlbi", "at", NULL};
static const char *const a64_branch[] = {"b", "bl", "br", "blr", "ret", "cbz", "cbnz", "tbz", "tbnz", "braa",
                                         "brab", "blraa", "blrab", "retaa", "retab", "eret", NULL};
static const char *const a64_fma[] = {"fmla", "fmls", "mla", "mls", "sdot", "udot", "usdot", "sudot",
                                      "bfdot", "bfmmla", "smmla", "ummla", "usmmla", "fmlal", "fmlal2",
                                      "fmlsl", "fmlsl2", "smlal", "smlal2", "umlal", "umlal2", "smlsl",
                                      "smlsl2", "umlsl", "umlsl2", "sqdmlal", "sqdmlal2", "sqdmlsl",
                                      "sqdmlsl2", "bfmlalb", "bfmlalt", "fcmla", NULL};

static void classify_a64(const char *m, const char *ops, uint64_t *v)
{
    int nregs;
    if (in_list(m, a64_branch) || starts(m, "b.")) {
        v[C_BRANCH]++;
        return;
    }
    if (in_list(m, a64_other)) {
        v[C_OTHER]++;
        return;
    }
    bool ld = starts(m, "ld"), st = starts(m, "st");
    if (ld || st) {
        char k = a64_first_reg_kind(ops, &nregs);
        bool pair = starts(m, "ldp") || starts(m, "stp") || starts(m, "ldnp") || starts(m, "stnp") ||
                    starts(m, "ldxp") || starts(m, "ldaxp") || starts(m, "stxp") || starts(m, "stlxp");
        int transfers = pair ? 2 : nregs;
        bool vec = k == 'q' || k == 'v';
        if (ld) {
            v[vec ? C_VLOAD : C_LOAD]++;
            v[S_LDOPS] += transfers;
        } else {
            v[vec ? C_VSTORE : C_STORE]++;
            v[S_STOPS] += transfers;
        }
        return;
    }
    int bits = a64_vector_bits(ops);
    if (bits) {
        v[in_list(m, a64_fma) ? C_FMA : C_VEC]++;
        v[S_V64] += bits / 64;
        return;
    }
    if (m[0] == 'f' || strcmp(m, "scvtf") == 0 || strcmp(m, "ucvtf") == 0) {
        v[C_FP]++;
        return;
    }
    v[C_INT]++;
}

static const char *const x86_other[] = {"nop", "endbr64", "endbr32", "pause", "lfence", "mfence", "sfence",
                                        "cpuid", "rdtsc", "rdtscp", "syscall", "hlt", "ud2", "int3", "int",
                                        "vzeroupper", "vzeroall", "xgetbv", "prefetcht0", "prefetcht1",
                                        "prefetcht2", "prefetchnta", "prefetchw", "clflush", "ldmxcsr",
                                        "stmxcsr", "vldmxcsr", "vstmxcsr", "fnstcw", "fldcw", NULL};
static const char *const x86_prefixes[] = {"rep", "repe", "repz", "repne", "repnz", "lock", "notrack",
                                           "bnd", "data16", NULL};

/* Pure data movement: a load if the source is memory, a store if the destination is. */
static bool x86_is_move(const char *m)
{
    static const char *const moves[] = {"mov", "movabs", "movzx", "movsx", "movsxd", "movups", "movaps",
                                        "movupd", "movapd", "movdqu", "movdqa", "movss", "movsd", "movd",
                                        "movq", "movntps", "movntdq", "movhps", "movlps", "movhpd",
                                        "movlpd", "lddqu", "movbe", NULL};
    const char *b = m[0] == 'v' ? m + 1 : m;
    if (in_list(b, moves) || starts(b, "movdq") || starts(b, "broadcast") || starts(b, "pbroadcast") ||
        starts(b, "movnt")) {
        return true;
    }
    return false;
}

static int x86_vector_bits(const char *ops)
{
    if (strstr(ops, "zmm")) {
        return 512;
    }
    if (strstr(ops, "ymm")) {
        return 256;
    }
    if (strstr(ops, "xmm")) {
        return 128;
    }
    return 0;
}

static bool x86_scalar_fp(const char *m)
{
    size_t n = strlen(m);
    if (n >= 2 && (strcmp(m + n - 2, "ss") == 0 || strcmp(m + n - 2, "sd") == 0)) {
        return true;
    }
    return strstr(m, "ss2") || strstr(m, "sd2") || strstr(m, "2ss") || strstr(m, "2sd") ||
           starts(m, "comis") || starts(m, "ucomis") || starts(m, "vcomis") || starts(m, "vucomis");
}

/*
 * x86-64: QEMU 7.2 disassembles in AT&T syntax ("vaddps 0x20(%rdi), %ymm1, %ymm1": sources
 * first, destination last, memory operands in parentheses); Intel syntax (destination first,
 * memory in brackets) is understood too. Loads and stores folded into arithmetic are counted
 * in ld_ops/st_ops; the class is the operation's.
 */
static void classify_x86(const char *m, const char *ops, uint64_t *v)
{
    bool att = strchr(ops, '%') != NULL || strchr(ops, '(') != NULL;
    /* Top-level operands and which of them are memory. */
    int nops = 0, mem_first = 0, mem_last = 0, mem_any = 0, depth = 0;
    bool cur_mem = false, cur_any = false;
    for (const char *p = ops;; p++) {
        char ch = *p;
        if (ch == '(' || ch == '[') {
            depth++;
            cur_mem = true;
        } else if (ch == ')' || ch == ']') {
            depth--;
        }
        if (ch && !(ch == ',' && depth == 0)) {
            if (ch != ' ') {
                cur_any = true;
            }
            continue;
        }
        if (cur_any) {
            nops++;
            if (cur_mem) {
                mem_any++;
                if (nops == 1) {
                    mem_first = 1;
                }
                mem_last = 1;
            } else {
                mem_last = 0;
            }
        }
        cur_mem = cur_any = false;
        if (!ch) {
            break;
        }
    }
    bool is_lea = starts(m, "lea");
    bool dst_mem = !is_lea && nops > 0 && (att ? mem_last : mem_first);
    bool src_mem = !is_lea && mem_any > (dst_mem ? 1 : 0);
    int bits = x86_vector_bits(ops);
    if (m[0] == 'j' || starts(m, "call") || starts(m, "ret") || starts(m, "loop")) {
        v[C_BRANCH]++;
        return;
    }
    if (in_list(m, x86_other) || starts(m, "nop") || starts(m, "prefetch") || starts(m, "endbr")) {
        v[C_OTHER]++;
        return;
    }
    if (starts(m, "push")) {
        v[C_STORE]++;
        v[S_STOPS]++;
        return;
    }
    if (starts(m, "pop")) {
        v[C_LOAD]++;
        v[S_LDOPS]++;
        return;
    }
    if (starts(m, "stos") || (starts(m, "movs") && nops == 0)) {
        v[C_STORE]++;
        v[S_STOPS]++;
        return;
    }
    if (x86_is_move(m) || (starts(m, "mov") && !bits)) {
        /* movd/movq/movss/movsd move one scalar even through a vector register. */
        const char *b = m[0] == 'v' ? m + 1 : m;
        bool scalar = x86_scalar_fp(m) || strcmp(b, "movd") == 0 || strcmp(b, "movq") == 0 || !bits;
        if (dst_mem) {
            v[scalar ? C_STORE : C_VSTORE]++;
            v[S_STOPS]++;
        } else if (src_mem) {
            v[scalar ? C_LOAD : C_VLOAD]++;
            v[S_LDOPS]++;
        } else {
            v[bits ? C_VEC : C_INT]++;
            v[S_V64] += scalar ? 0 : bits / 64;
        }
        return;
    }
    if (src_mem) {
        v[S_LDOPS]++;
    }
    if (dst_mem) { /* read-modify-write */
        v[S_LDOPS]++;
        v[S_STOPS]++;
    }
    if (bits || m[0] == 'k') {
        bool fma = strstr(m, "fmadd") || strstr(m, "fmsub") || strstr(m, "fnmadd") || strstr(m, "fnmsub") ||
                   starts(m, "vpdp") || starts(m, "vpmadd") || starts(m, "pmadd");
        if (x86_scalar_fp(m)) {
            v[C_FP]++;
        } else {
            v[fma ? C_FMA : C_VEC]++;
            v[S_V64] += bits / 64;
        }
        return;
    }
    if (m[0] == 'f') { /* x87 */
        v[C_FP]++;
        return;
    }
    v[C_INT]++;
}

static void classify(const char *disas, uint64_t *v)
{
    char m[32];
    const char *p = disas;
    for (;;) {
        while (*p == ' ' || *p == '\t') {
            p++;
        }
        size_t n = 0;
        while (p[n] && p[n] != ' ' && p[n] != '\t' && n < sizeof(m) - 1) {
            m[n] = (char)tolower((unsigned char)p[n]);
            n++;
        }
        m[n] = 0;
        p += n;
        if (!(g_x86 && in_list(m, x86_prefixes) && *p)) {
            break;
        }
    }
    while (*p == ' ' || *p == '\t') {
        p++;
    }
    if (g_x86) {
        classify_x86(m, p, v);
    } else {
        classify_a64(m, p, v);
    }
}

/* ------------------------------------------------------------------ translation */

/* How an instruction at pc is instrumented (enum kind); count-only wins over the rest. */
static int range_kind(uint64_t pc)
{
    int kind = K_NONE;
    for (int i = 0; i < g_nranges; i++) {
        if (pc < g_ranges[i][0] || pc >= g_ranges[i][1]) {
            continue;
        }
        uint64_t f = g_ranges[i][2];
        int k = (f & RANGE_NO_MEMORY) ? K_COUNT_ONLY : (f & RANGE_PLT) ? K_PLT : (f & RANGE_GATED) ? K_GATED : K_FULL;
        if (k == K_COUNT_ONLY) {
            return k;
        }
        if (kind == K_NONE || kind == K_FULL) {
            kind = k;
        }
    }
    return kind;
}

static void on_tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    uint64_t pc = qemu_plugin_tb_vaddr(tb);
    if (g_launch && pc == g_launch) {
        qemu_plugin_register_vcpu_tb_exec_cb(tb, on_launch, QEMU_PLUGIN_CB_NO_REGS, NULL);
    }
    size_t n = qemu_plugin_tb_n_insns(tb);
    TBInfo *info = NULL;
    int tb_kind = K_NONE;
    for (size_t i = 0; i < n; i++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        uint64_t a = qemu_plugin_insn_vaddr(insn);
        int kind = range_kind(a);
        if (!kind) {
            continue;
        }
        if (!info) {
            info = g_new0(TBInfo, 1);
            info->text = g_string_new(NULL);
            info->pc = a;
            tb_kind = kind;
        } else if (kind != tb_kind && tb_kind == K_FULL) {
            tb_kind = kind; /* a TB that runs into the PLT behaves as PLT */
        }
        info->kind = tb_kind;
        char *d = qemu_plugin_insn_disas(insn);
        uint64_t before[NTB];
        memcpy(before, info->v, sizeof(before));
        classify(d ? d : "", info->v);
        g_string_append(info->text, d ? d : "");
        g_string_append_c(info->text, '\n');
        int c = 0;
        for (c = 0; c < NCLS && info->v[c] == before[c]; c++) {
        }
        if (g_dump) {
            pthread_mutex_lock(&g_lock);
            fprintf(g_dump, "%" PRIx64 "\t%s\t%" PRIu64 "\t%" PRIu64 "\t%" PRIu64 "\t%s\n", a,
                    c < NCLS ? cls_names[c] : "?", info->v[S_LDOPS] - before[S_LDOPS],
                    info->v[S_STOPS] - before[S_STOPS], info->v[S_V64] - before[S_V64], d ? d : "");
            fflush(g_dump);
            pthread_mutex_unlock(&g_lock);
        }
        g_free(d);
        /*
         * QEMU 7.2 points the vCPU at an instruction's memory callbacks before it runs and
         * clears that after it; a branch ends its TB before the clearing, and later helper
         * accesses of uninstrumented code (atomics in the runtime) would then call the stale
         * callbacks. So branches (and system instructions) get none: their only accesses are
         * x86 call/ret stack slots and a PLT's GOT load, which do not matter for the caches.
         */
        if ((kind == K_FULL || kind == K_PLT || kind == K_GATED) && c != C_BRANCH && c != C_OTHER) {
            InsnInfo *ii = g_new0(InsnInfo, 1);
            ii->vaddr = a;
            ii->gated = kind == K_GATED;
            pthread_mutex_lock(&g_lock);
            g_ptr_array_add(g_insninfos, ii);
            pthread_mutex_unlock(&g_lock);
            qemu_plugin_register_vcpu_mem_cb(insn, on_mem, QEMU_PLUGIN_CB_NO_REGS, QEMU_PLUGIN_MEM_RW, ii);
        }
    }
    if (info) {
        qemu_plugin_register_vcpu_tb_exec_cb(tb, on_tb_exec, QEMU_PLUGIN_CB_NO_REGS, info);
        pthread_mutex_lock(&g_lock);
        info->id = g_tb_id_base + g_tbinfos->len;
        g_ptr_array_add(g_tbinfos, info);
        g_tbs_instrumented++;
        pthread_mutex_unlock(&g_lock);
    }
}

/* ------------------------------------------------------------------ guest protocol */

static void emit_hello(void)
{
    fprintf(g_out, "{\"hello\": \"mnv2cost\", \"protocol\": %d, \"target\": \"%s\", \"line\": %u, "
            "\"levels\": [", MNV2_PROTOCOL, g_target, 1u << g_line_shift);
    for (int l = 0; l < g_levels; l++) {
        fprintf(g_out, "%s[%" PRIu64 ", %u]", l ? ", " : "", g_level_size[l], g_level_assoc[l]);
    }
    fprintf(g_out, "], \"fields\": [");
    for (int i = 0; i < NCLS; i++) {
        fprintf(g_out, "\"%s\", ", cls_names[i]);
    }
    fprintf(g_out, "\"ld_ops\", \"st_ops\", \"v64\", \"ld_acc\", \"st_acc\", \"ld_bytes\", \"st_bytes\"");
    for (int l = 0; l < MAXLEVELS; l++) {
        for (int f = 0; f < NLF; f++) {
            fprintf(g_out, ", \"l%d_%s\"", l + 1, level_field_names[f]);
        }
    }
    fprintf(g_out, "]}\n");
    fflush(g_out);
}

static void emit_record(uint64_t tag)
{
    uint64_t w = atomic_load(&g_window);
    uint64_t regions = atomic_load(&g_region) + 1;
    fprintf(g_out, "{\"tag\": %" PRIu64 ", \"window\": %" PRIu64 ", \"regions\": %" PRIu64
            ", \"tbs\": %" PRIu64 ", \"threads\": [", tag, w, regions, g_tbs_instrumented);
    bool first_thread = true;
    for (unsigned i = 0; i < MAXVCPUS; i++) {
        VCPU *v = atomic_load(&g_vcpus[i]);
        if (!v || v->window_seen != w || v->used == 0) {
            continue;
        }
        fprintf(g_out, "%s{\"vcpu\": %u, \"regions\": [", first_thread ? "" : ", ", i);
        first_thread = false;
        bool first_region = true;
        for (size_t r = 0; r < v->used; r++) {
            const uint64_t *s = v->stats + r * NSTAT;
            bool any = false;
            for (int k = 0; k < NSTAT && !any; k++) {
                any = s[k] != 0;
            }
            if (!any) {
                continue;
            }
            fprintf(g_out, "%s[%zu", first_region ? "" : ", ", r);
            first_region = false;
            for (int k = 0; k < NSTAT; k++) {
                fprintf(g_out, ", %" PRIu64, s[k]);
            }
            fputc(']', g_out);
        }
        fprintf(g_out, "], \"blocks\": [");
        bool first = true;
        for (size_t h = 0; h < v->blocks.cap; h++) {
            uint64_t k = v->blocks.keys[h];
            if (k == INVALID) {
                continue;
            }
            fprintf(g_out, "%s[%" PRIu64 ", %" PRIu64 ", %" PRIu64 "]", first ? "" : ", ", k >> 32, k & 0xffffffffu,
                    v->blocks.vals[h]);
            first = false;
        }
        fprintf(g_out, "], \"edges\": [");
        first = true;
        for (size_t h = 0; h < v->edges.cap; h++) {
            uint64_t k = v->edges.keys[h];
            if (k == INVALID) {
                continue;
            }
            fprintf(g_out, "%s[%" PRIu64 ", %" PRIu64 ", %" PRIu64 ", %" PRIu64 "]", first ? "" : ", ", k >> 48,
                    (k >> 24) & NO_BLOCK, k & NO_BLOCK, v->edges.vals[h]);
            first = false;
        }
        fprintf(g_out, "]}");
    }
    /* The disassembly of every block executed in this window (by any thread). */
    fprintf(g_out, "], \"tbs\": {");
    bool first_tb = true;
    pthread_mutex_lock(&g_lock);
    guint ntb = g_tbinfos->len;
    bool *used = g_new0(bool, ntb ? ntb : 1);
    for (unsigned vi = 0; vi < MAXVCPUS; vi++) {
        VCPU *v = atomic_load(&g_vcpus[vi]);
        if (!v || v->window_seen != w || !v->blocks.keys) {
            continue;
        }
        for (size_t h = 0; h < v->blocks.cap; h++) {
            if (v->blocks.keys[h] != INVALID) {
                uint64_t id = v->blocks.keys[h] & 0xffffffffu;
                if (id >= g_tb_id_base && id - g_tb_id_base < ntb) {
                    used[id - g_tb_id_base] = true;
                }
            }
        }
    }
    for (guint i = 0; i < ntb; i++) {
        TBInfo *t = g_ptr_array_index(g_tbinfos, i);
        if (!used[i]) {
            continue;
        }
        fprintf(g_out, "%s\"%u\": [%" PRIu64 ", \"", first_tb ? "" : ", ", t->id, t->pc);
        first_tb = false;
        for (const char *c = t->text->str; *c; c++) {
            if (*c == '"' || *c == '\\') {
                fputc('\\', g_out);
                fputc(*c, g_out);
            } else if (*c == '\n') {
                fputs("\\n", g_out);
            } else if ((unsigned char)*c < 0x20) {
                fputc(' ', g_out);
            } else {
                fputc(*c, g_out);
            }
        }
        fputs("\"]", g_out);
    }
    g_free(used);
    pthread_mutex_unlock(&g_lock);
    fprintf(g_out, "}}\n");
    fflush(g_out);
}

static void register_callbacks(qemu_plugin_id_t id);

static void tbinfo_free(gpointer p)
{
    TBInfo *t = p;
    if (t->text) {
        g_string_free(t->text, TRUE);
    }
    g_free(t);
}

static void on_reset_done(qemu_plugin_id_t id)
{
    /* All translations are gone: the per-TB data of the old ones is unreachable. */
    pthread_mutex_lock(&g_lock);
    g_tb_id_base += g_tbinfos->len;
    g_ptr_array_set_size(g_tbinfos, 0);
    g_ptr_array_set_size(g_insninfos, 0);
    g_tbs_instrumented = 0;
    pthread_mutex_unlock(&g_lock);
    register_callbacks(id);
}

static void on_syscall(qemu_plugin_id_t id, unsigned int vcpu_index, int64_t num, uint64_t a1,
                       uint64_t a2, uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6, uint64_t a7,
                       uint64_t a8)
{
    if (num != MNV2_SYSCALL) {
        return;
    }
    switch (a1) {
    case OP_HELLO:
        emit_hello();
        break;
    case OP_RANGE_CLEAR:
        g_npending = 0;
        break;
    case OP_RANGE_ADD:
        if (g_npending < MAXRANGES && a3 > a2) {
            g_pending[g_npending][0] = a2;
            g_pending[g_npending][1] = a3;
            g_pending[g_npending][2] = a4;
            g_npending++;
        }
        break;
    case OP_SET_LAUNCH:
        g_pending_launch = a2;
        break;
    case OP_COMMIT: {
        bool same = g_npending == g_nranges && g_pending_launch == g_launch &&
                    memcmp(g_pending, g_ranges, sizeof(g_ranges[0]) * g_npending) == 0;
        if (!same) {
            memcpy(g_ranges, g_pending, sizeof(g_ranges[0]) * g_npending);
            g_nranges = g_npending;
            g_launch = g_pending_launch;
            /* Code translated under the old ranges must be translated again. */
            qemu_plugin_reset(g_id, on_reset_done);
        }
        break;
    }
    case OP_OPEN:
        if (a2 & FLAG_RESET) {
            atomic_fetch_add(&g_epoch, 1);
        }
        atomic_store(&g_region, 0);
        atomic_fetch_add(&g_window, 1);
        atomic_store(&g_counting, (a2 & FLAG_COUNT) != 0);
        atomic_store(&g_open, true);
        break;
    case OP_CLOSE:
        if (atomic_load(&g_open)) {
            atomic_store(&g_open, false);
            if (atomic_load(&g_counting)) {
                atomic_store(&g_counting, false);
                emit_record(a2);
                if (g_dump) {
                    pthread_mutex_lock(&g_lock);
                    fprintf(g_dump, "# window %" PRIu64 " tag %" PRIu64 "\n", (uint64_t)atomic_load(&g_window), a2);
                    for (unsigned vi = 0; vi < MAXVCPUS; vi++) {
                        VCPU *v = atomic_load(&g_vcpus[vi]);
                        if (!v || !v->pm_keys) {
                            continue;
                        }
                        for (size_t h = 0; h < v->pm_cap; h++) {
                            if (v->pm_keys[h] != INVALID) {
                                fprintf(g_dump, "page\t%u\t%" PRIu64 "\t%" PRIx64 "\n", vi, v->pm_vals[h],
                                        v->pm_keys[h]);
                            }
                        }
                    }
                    for (guint i = 0; i < g_insninfos->len; i++) {
                        InsnInfo *ii = g_ptr_array_index(g_insninfos, i);
                        if (ii->accesses) {
                            fprintf(g_dump, "acc\t%" PRIx64 "\t%" PRIu64 "\n", ii->vaddr, ii->accesses);
                            ii->accesses = 0;
                        }
                    }
                    fflush(g_dump);
                    pthread_mutex_unlock(&g_lock);
                }
            }
        }
        break;
    default:
        break;
    }
}

static void on_vcpu_init(qemu_plugin_id_t id, unsigned int vcpu_index)
{
    vcpu_get(vcpu_index);
}

static void on_exit_cb(qemu_plugin_id_t id, void *p)
{
    if (g_out) {
        fflush(g_out);
    }
}

static void register_callbacks(qemu_plugin_id_t id)
{
    qemu_plugin_register_vcpu_init_cb(id, on_vcpu_init);
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_tb_trans);
    qemu_plugin_register_vcpu_syscall_cb(id, on_syscall);
    qemu_plugin_register_atexit_cb(id, on_exit_cb, NULL);
}

static bool parse_level(const char *val, int l)
{
    char *end;
    uint64_t size = strtoull(val, &end, 0);
    if (*end != ':') {
        return false;
    }
    uint32_t assoc = (uint32_t)strtoul(end + 1, &end, 0);
    if (*end || size == 0 || assoc == 0) {
        return false;
    }
    g_level_size[l] = size;
    g_level_assoc[l] = assoc;
    return true;
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc,
                                           char **argv)
{
    const char *out = NULL, *dump = NULL;
    bool have[MAXLEVELS] = {false};
    for (int i = 0; i < argc; i++) {
        char *eq = strchr(argv[i], '=');
        if (!eq) {
            fprintf(stderr, "mnv2cost: argument without '=': %s\n", argv[i]);
            return -1;
        }
        *eq = 0;
        const char *key = argv[i], *val = eq + 1;
        if (strcmp(key, "out") == 0) {
            out = val;
        } else if (strcmp(key, "dump") == 0) {
            dump = val;
        } else if (strcmp(key, "line") == 0) {
            unsigned long line = strtoul(val, NULL, 0);
            if (line < 8 || (line & (line - 1)) || line > 4096) {
                fprintf(stderr, "mnv2cost: line must be a power of two (8..4096)\n");
                return -1;
            }
            g_line_shift = (uint32_t)__builtin_ctzl(line);
        } else if (key[0] == 'l' && key[1] >= '1' && key[1] <= '0' + MAXLEVELS && key[2] == 0) {
            int l = key[1] - '1';
            if (!parse_level(val, l)) {
                fprintf(stderr, "mnv2cost: %s wants SIZE:ASSOC, got %s\n", key, val);
                return -1;
            }
            have[l] = true;
        } else {
            fprintf(stderr, "mnv2cost: unknown argument %s\n", key);
            return -1;
        }
    }
    if (!out) {
        fprintf(stderr, "mnv2cost: out=PATH is required\n");
        return -1;
    }
    for (g_levels = 0; g_levels < MAXLEVELS && have[g_levels]; g_levels++) {
    }
    g_out = fopen(out, "a");
    if (!g_out) {
        fprintf(stderr, "mnv2cost: cannot open %s\n", out);
        return -1;
    }
    if (dump) {
        g_dump = fopen(dump, "a");
    }
    g_id = id;
    g_target = g_strdup(info->target_name ? info->target_name : "");
    g_x86 = strcmp(g_target, "x86_64") == 0 || strcmp(g_target, "i386") == 0;
    g_tbinfos = g_ptr_array_new_with_free_func(tbinfo_free);
    g_insninfos = g_ptr_array_new_with_free_func(g_free);
    register_callbacks(id);
    return 0;
}
