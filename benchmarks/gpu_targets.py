"""NVIDIA GPUs described for XLA without the GPU: the target description
(XLA's GpuTargetConfigProto, as text) that
`jax.experimental.topologies.get_topology_desc(platform="cuda",
target_config=..., topology="1x1x1")` takes to compile for a GPU on a
machine that has none (openxla/xla#16913; jax's tests/aot_test.py).

Each figure is NVIDIA's published one for the SXM part: the A100 and H100
datasheets and the CUDA C++ Programming Guide's table of compute
capabilities (shared memory, registers, threads per SM); the memory size is
the board's 80 GB.
"""

from __future__ import annotations

# name -> (SMs, FP32 lanes per SM, compute capability, shared memory per SM
# and per block (opt-in), L2 bytes, HBM bytes/s, boost clock GHz, HBM bytes)
GPUS = {
    "NVIDIA A100-SXM4-80GB": (108, 64, (8, 0), 167_936, 166_912, 41_943_040, 2_039e9, 1.41, 80e9),
    "NVIDIA H100 80GB HBM3": (132, 128, (9, 0), 233_472, 232_448, 52_428_800, 3_352e9, 1.98, 80e9),
}


def target_config(name: str, cudnn=(9, 8), cuda_runtime=(12, 8)) -> str:
    """The text GpuTargetConfigProto of GPU `name` (a key of GPUS)."""
    sms, lanes, (major, minor), shared_per_sm, shared_optin, l2, bandwidth, clock, memory = GPUS[name]
    return f"""
gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {shared_per_sm}
  threads_per_core_limit: 2048
  core_count: {sms}
  fpus_per_core: {lanes}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(bandwidth)}
  l2_cache_size: {l2}
  clock_rate_ghz: {clock}
  device_memory_size: {int(memory)}
  shared_memory_per_block_optin: {shared_optin}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: {cudnn[0]} minor: {cudnn[1]} }}
runtime_version {{ major: {cuda_runtime[0]} minor: {cuda_runtime[1]} }}
device_description_str: "{name}"
"""


GPU_TARGETS = {name: target_config(name) for name in GPUS}
