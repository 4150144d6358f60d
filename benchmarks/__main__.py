"""`python -m benchmarks`: the list of benchmarks and their commands."""
import benchmarks

print(benchmarks.__doc__)
