"""Training: `loop.train` drives a run (data, mesh, state, the jitted step, logs, evaluation, checkpoints).

    state.py       the train state (params, optimizer state, router biases, RNG) and its shardings
    optimizer.py   AdamW and the schedules (learning rate, MTP weight lambda, bias rate gamma)
    balance.py     the bias rules, the balance losses (sequence- and batch-wise), MaxVio
    step.py        one jitted train step (CE + MTP + sequence-wise balance loss, AdamW, the bias rule)
    checkpoint.py  orbax checkpoints of the whole run, checksummed, with fallback to the last good step
    loop.py        the driver that `python -m dsv3_jax train` runs

Submodules are imported explicitly (`from dsv3_jax.train.loop import train`): importing this package
loads nothing heavy.
"""
