"""The trainer, by job:

    config.py      the config tree (typed YAML parsing, overrides, validation)
    data.py        model and token windows, data order and micro-batches
    loop.py        `train`: the loop that calls the steps, checkpoint cadence, rollback
    steps.py       the named steps: resume, float side, calibrate, prepare, train step (loss of
                   optim.loss: kd / ce / kd+ce), evaluate, export
    sources.py     the training windows of data.source (corpus, teacher-sampled, mix)
    topk.py        optim.kd_topk: the teacher's top-k logits of the run's windows on disk
    domains.py     scoring on data.eval_domains (held-out, wiki, ...): ppl, ratio, KL, top-1
    schedule.py    LR and tau schedules (and re-basing the LR on resume / rollback)
    state.py       the counters and RNG states a checkpoint carries
    guard.py       the divergence guard (finite loss, gradients, weights; loss spikes)
    resume.py      which config changes ``--resume`` applies and which it refuses
    checkpoint.py  crash-safe checkpoints, ``latest`` / ``best``, pruning
    lock.py        one run per output directory
    commands.py    what ``edkm eval`` (every eval domain) / ``export`` / ``lowrank`` do
"""
