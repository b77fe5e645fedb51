"""benchmarks/kernel_resources.py reads the compiler's report of each real kernel tile (the
compiling needs Triton, which CI does not install; the reading is checked here)."""

from ..conftest import load_benchmark


def test_the_report_counts_registers_spills_and_hopper_instructions():
    bench = load_benchmark("kernel_resources")
    resources = " Function _real_conv_kernel:\n  REG:255 STACK:512 SHARED:0 LOCAL:0 CONSTANT[0]:680\n"
    sass = "\n".join([
        "        /*0100*/                   LDGSTS.E.BYPASS.LTC128B.128 [R1], desc[UR4][R2.64] ;",
        "        /*0110*/                   IGMMA.64x64x32.S8.S8 R24, gdesc[UR8], R24 ;",
        "        /*0120*/              @!P0 LDL.64 R2, [R1+0x10] ;",
        "        /*0130*/                   STL [R1+0x8], R5 ;",
        "        /*0140*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;",
        "        /*0150*/                   IMMA.16816.S8.S8 R4, R8, R12, R4 ;",
        "        /*0160*/              @P1 LDG.E.U8 R9, desc[UR6][R10.64] ;",
        "        /*0170*/                   LDG.E.U16 R11, desc[UR6][R12.64] ;",
    ])
    got = bench.sass_summary(resources, sass)
    assert got == {"regs": 255, "stack": 512, "wgmma": 2, "mma": 1, "cp_async": 1, "ldl": 1,
                   "stl": 1, "byte_loads": 1, "instructions": 8}
    tile = (128, 64, 64, 4, 3)
    assert bench.constants("conv_packed", tile) == {
        "HAS_STEPS": True, "HAS_BIAS": True, "IEEE": False, "PACKED": True, "PRE": True,
        "ZERO": 1, "KH": 3, "KW": 3, "PH": 1, "PW": 1, "TAP_MAJOR": True, "PAIRED": True,
        "FLOAT_W": False, "BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}
    assert bench.constants("linear", tile)["ZERO"] == 0 and "KH" not in bench.constants("linear", tile)
    assert bench.constants("conv", tile)["TAP_MAJOR"] and not bench.constants("conv", tile)["PAIRED"]
    # the stored float weights of A16 beside A8: int8 codes (centered), FLOAT_W on
    for kind in ("linear_float", "conv_float"):
        consts = bench.constants(kind, tile)
        assert consts["FLOAT_W"] and not consts["PACKED"] and consts["ZERO"] == 0, kind
