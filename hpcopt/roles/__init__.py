"""The roles a rank plays in a run, one module each:

    train    set a run up on every rank and hand each rank to its role (`hpcopt train`)
    server   a rank that owns a shard of the center and serves the workers' exchanges
    worker   an asynchronous worker: local steps, an exchange every tau steps, leaving gracefully
    sync     the synchronous ranks of DP-SGD, Local SGD and DiLoCo
    join     ranks of another MPI job that join a running training (`hpcopt join`)
    local    a rank's local training (data order, schedule, gradient, local step), which every
             training role uses
"""
