"""The models a job trains with: its student (or teacher) and the model that teaches it, built in one place.

Every initialisation draws from the job's own seed stream, so a job builds the same models in any process.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kdbench import KdbenchError
from kdbench.data.batches import DeviceData
from kdbench.train.engine import EngineOptions
from kdbench.method import TeacherRoute
from kdbench.plan import Job, Plan
from kdbench.seeding import stream_seed
from kdbench.storage.store import ModelStore
from kdbench.storage.files import checked_load
from kdbench.zoo import create_model


def to_device(model: torch.nn.Module, opts: EngineOptions) -> torch.nn.Module:
    model = model.to(opts.device)
    return model.to(memory_format=torch.channels_last) if opts.channels_last else model


def build_model(job: Job, data: DeviceData, opts: EngineOptions) -> torch.nn.Module:
    torch.manual_seed(stream_seed(job.seed, "init"))  # the initialisation stream of this job's seed
    kwargs = dict(job.config["model_kwargs"])
    if job.source == "pretrained":
        kwargs["pretrained"] = True
    model = create_model(job.model, data.info.num_classes, data.info.input_shape[0], **kwargs)
    if job.source == "checkpoint":  # the file the plan hashed, checked again before a byte of it is unpickled
        model.load_state_dict(checked_load(Path(job.checkpoint), job.config["checkpoint_sha256"]))
    return to_device(model, opts)


def build_teacher(plan: Plan, job: Job, data: DeviceData, store: ModelStore,
                  opts: EngineOptions) -> torch.nn.Module | None:
    """The model that teaches `job`, as the method's needs say: stored (final or a route epoch) or fresh."""
    if job.teacher_init == "random":  # trained here, with the student (ProKT): its own init stream
        torch.manual_seed(stream_seed(job.seed, "teacher_init"))
        teacher = create_model(job.teacher_model, data.info.num_classes, data.info.input_shape[0],
                               **job.config["teacher_model_kwargs"])
    elif job.teacher:
        teacher_job = plan.job(job.teacher)
        teacher = create_model(teacher_job.model, data.info.num_classes, data.info.input_shape[0],
                               **teacher_job.config["model_kwargs"])
        if job.teacher_init == "checkpoint" and job.teacher_epoch:
            route = store.route(job.teacher)
            if job.teacher_epoch not in route:
                raise KdbenchError(f"teacher_epoch {job.teacher_epoch}: the stored teacher {teacher_job.model} "
                                   f"has route checkpoints at epochs {sorted(route)}")
            teacher.load_state_dict(store.load_route(job.teacher, job.teacher_epoch))
        else:
            teacher.load_state_dict(store.load_final(job.teacher))
    else:
        return None
    return to_device(teacher, opts)


def build_guides(plan: Plan, job: Job, teacher: torch.nn.Module, data: DeviceData, store: ModelStore,
                 opts: EngineOptions) -> list[torch.nn.Module]:
    """`Needs.dense` (DGKD): the stored models above `job` in its chain (the pair's teacher first), then `teacher`,
    the job's own."""
    guides = []
    for key in plan.guide_keys(job)[:-1]:
        above = plan.job(key)
        model = create_model(above.model, data.info.num_classes, data.info.input_shape[0],
                             **above.config["model_kwargs"])
        model.load_state_dict(store.load_final(key))
        guides.append(to_device(model, opts))
    return guides + [teacher]


def teacher_route(plan: Plan, job: Job, store: ModelStore) -> TeacherRoute:
    key = plan.root_teacher(job).key
    return TeacherRoute(sorted(store.route(key)), lambda epoch: store.load_route(key, epoch))
