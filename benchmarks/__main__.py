from benchmarks import bench_linear

bench_linear.main()
