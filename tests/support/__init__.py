"""Development tools the tests, the benchmarks and the demo share; none of it ships in the package."""
