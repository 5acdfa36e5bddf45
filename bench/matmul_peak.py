"""Prints the measured matmul peak of this machine, the denominator of every MFU we quote.

python bench/matmul_peak.py [--sizes=512,1024,2048] [--dtypes=float32,bfloat16]
"""

from absl import app, flags

from parti.modeling import flops

_SIZES = flags.DEFINE_list("sizes", ["512", "1024", "2048"], "Square matmul sides.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32"], "Matmul dtypes.")


def main(argv):
  del argv
  print(f"{'dtype':>9} {'size':>6} {'GFLOP/s':>9}  device")
  for dtype in _DTYPES.value:
    for size in map(int, _SIZES.value):
      peak = flops.measure_matmul_peak(size=size, dtype=dtype)
      print(f"{dtype:>9} {size:>6} {peak.flops_per_second / 1e9:>9.1f}  {peak.device}")


if __name__ == "__main__":
  app.run(main)
