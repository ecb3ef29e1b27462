"""What a lowered program (StableHLO text) holds: its convolutions by kind."""
import collections
import re

_CONV = re.compile(r"stablehlo\.convolution\((?P<lhs>%[\w#.]+), (?P<rhs>%[\w#.]+)\) dim_numbers = "
                   r"\[(?P<ld>[^\]]*)\]x\[(?P<rd>[^\]]*)\]->\[[^\]]*\], window = \{[^}]*\} \{(?P<attrs>[^}]*)\}"
                   r".*?: \((?P<lt>tensor<[^>]*>), (?P<rt>tensor<[^>]*>)\)")


def conv_kinds(module_text: str) -> collections.Counter:
  """Counts of the program's convolutions by kind: 'feature-grouped' / 'batch-grouped' / 'ordinary', and whether
  the window (the kernel operand's spatial size) spans its input ('whole input': a kernel gradient's form)."""
  kinds = collections.Counter()
  for m in _CONV.finditer(module_text):
    dims = lambda t: [int(x) for x in re.findall(r"(\d+)x", t)]
    lhs_dims, rhs_dims = m.group("ld").split(", "), m.group("rd").split(", ")
    lhs_space = [d for d, name in zip(dims(m.group("lt")), lhs_dims) if name.isdigit()]
    window = [d for d, name in zip(dims(m.group("rt")), rhs_dims) if name.isdigit()]
    fgc = int(re.search(r"feature_group_count = (\d+)", m.group("attrs")).group(1))
    bgc = int(re.search(r"batch_group_count = (\d+)", m.group("attrs")).group(1))
    kind = "feature-grouped" if fgc > 1 else "batch-grouped" if bgc > 1 else "ordinary"
    whole = all(w >= max(s // 2, 4) for w, s in zip(window, lhs_space))
    kinds[(kind, "whole input" if whole else "small window")] += 1
  return kinds
