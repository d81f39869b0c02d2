"""Kernels written by hand for CPUs: register-tiled schedules (:mod:`.schedules`) that tuning
measures beside MetaSchedule's own, and the loop order of tuned kernels' parallel loops
(:mod:`.loop_order`) that compile applies where tuning found it no slower."""
