"""raftsuite: the experiment suite around raftlib (notebook helpers, the tiny language model, reports).

raftlib stays a thin, general RAFT library; everything specific to reproducing the paper's
experiments offline lives here and is called from the notebooks.
"""
