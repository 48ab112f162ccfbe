"""Where a stage's heavy map runs when it leaves this process: a Ray Data actor pool.

:mod:`mmemb.distributed.ray_data` runs a sharded stage's unfinished shards on Ray (local or a
cluster); :func:`mmemb.sharding.run_sharded` calls it when ``distributed.backend`` is
``ray``. Nothing here imports Ray at module level: ``ray`` is an optional extra.
"""
