from hire.bench.decode import run_bench

__all__ = ["run_bench"]
