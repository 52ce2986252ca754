"""silofed's benchmarks: utility on real customer data and cost against baselines in the same run.

`python -m bench [NAME ...] [--quick]` (or `make bench`) runs the named benchmarks (all by
default), stores each one's figures with the machine, versions and seeds in
`docs/benchmarks.json`, and regenerates `docs/benchmarks.md` from that file. Every figure is
compared with a baseline measured in the same run: a centralised model, a plain loop doing the
same arithmetic, non-private training. Nothing here is imported by silofed itself.
"""
