"""What a sweep can be refused for, checked before any model loads or anything is written.

``check_sweep(config)`` runs in ``fitprune sweep`` and in the Prefect flow's parameter
validation alike: the device string and its availability, that the model can read the sources,
the checkpoint's weight files, and the data root (usable, writable, free of glob characters).
Messages name the CLI flag; the flow's parameter of the same name (``source``, ``benchmarks``,
``device``) means the same.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["check_sweep"]

# files of which a checkpoint needs at least one to read questions (processor or tokenizer)
_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "tokenizer_config.json", "tokenizer.json")


def check_sweep(config) -> None:
    """What a sweep (a ``flows.config.SweepConfig``) can be refused for, checked before any model loads or
    anything is written: the device, that the model can read the sources, the checkpoint's weight
    files, the data root."""
    from flows.fanout import check_cluster
    from storage.root import check_root
    from tasks import sources
    from tasks.models import check_weight_files, normalize_spec

    config = config.resolved()
    spec = normalize_spec(config.spec())  # the device (tasks.models.check_device); a path model is a checkpoint directory
    used = [("--source", config.source), *(("--benchmarks", b) for b in config.benchmarks)]
    questions = [(flag, s) for flag, s in used if sources.is_question_source(s)]
    if questions and spec["kind"] == "toy":
        flag, source = questions[0]
        raise ValueError(f"{flag} {source} holds questions and images, which the toy model cannot read (it has "
                         "no processor); use --source toy with the toy model, or --model demo or a checkpoint "
                         "directory saved with its processor")
    if questions and spec["kind"] == "path" and not any((Path(spec["path"]) / f).is_file() for f in _PROCESSOR_FILES):
        flag, source = questions[0]
        raise ValueError(f"{flag} {source} holds questions and images, but {spec['path']} has no processor or "
                         f"tokenizer files ({', '.join(_PROCESSOR_FILES)}); save the processor with the checkpoint, "
                         "or use an input source (toy, hf:/path)")
    toy = [(flag, s) for flag, s in used if sources.parse(s).kind == "toy"]
    if toy and spec["kind"] == "demo":
        raise ValueError(f"{toy[0][0]} toy holds random inputs made for the toy model (its token ids and 48-pixel "
                         "images), which the demo model cannot read; use --model toy (or a saved toy checkpoint), "
                         "or a question source such as easy-vqa:train")
    if spec["kind"] == "path":
        check_weight_files(spec["path"])
    check_cluster(config.cluster, config.device)  # the form of --cluster, and a device every worker has
    check_root(config.data_root)  # last: it creates the root if missing
