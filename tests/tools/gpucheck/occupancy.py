"""Resident blocks and warps per SM from registers, shared memory and warps per block (the CUDA
occupancy calculator's rules for sm_80 and sm_90)."""

# Per SM: 64K 32-bit registers, at most 64 warps and 32 blocks; shared memory usable by blocks
# (A100: 164 KiB, H100: 228 KiB), 1 KiB of it reserved per block by the runtime.
LIMITS = {80: {"smem": 164 * 1024, "warps": 64}, 90: {"smem": 228 * 1024, "warps": 64}}
REGISTERS = 65536
MAX_BLOCKS = 32
REG_UNIT = 256  # registers are allocated per warp in units of 256


def occupancy(arch: int, registers: int, shared_bytes: int, num_warps: int) -> dict:
    """{"blocks": resident blocks per SM, "warps": resident warps, "limit": what bounds them}."""
    limits = LIMITS[arch]
    regs_per_warp = -(-max(registers, 1) * 32 // REG_UNIT) * REG_UNIT
    by = {"registers": REGISTERS // regs_per_warp // num_warps,
          "shared": limits["smem"] // (shared_bytes + 1024),
          "warps": limits["warps"] // num_warps,
          "blocks": MAX_BLOCKS}
    limit = min(by, key=by.get)
    return {"blocks": by[limit], "warps": by[limit] * num_warps, "limit": limit}
