"""TeleChat2 checkpoint conversion: HF <-> MindSpore (MindFormers names) and (tp, pp) resharding.

    from convert import hf_to_ms, ms_to_hf, reshard, merge
    hf_to_ms("TeleChat2-7B/", "telechat2_7b.safetensors", dtype="bf16")
    ms_to_hf("telechat2_7b.safetensors", "TeleChat2-7B-hf/")
    reshard("telechat2_7b.safetensors", "telechat2_7b_tp2_pp2/", tp=2, pp=2)

Command line: `python -m convert {hf2ms,ms2hf,reshard,merge} --help`. The key map is convert.keymap,
the tensor-parallel split rules telechat2_ms.parallel.plan. Every conversion streams one tensor at a time,
refuses inputs that do not match the config before writing anything, and writes its output atomically.
"""
from convert.errors import ConversionError
from convert.hf_to_ms import hf_to_ms
from convert.ms_to_hf import ms_to_hf
from convert.reshard import merge, reshard

__all__ = ["ConversionError", "hf_to_ms", "ms_to_hf", "reshard", "merge"]
