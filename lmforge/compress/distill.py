"""`lmforge distill`: train a student on a teacher's softened predictions (Hinton et al. 2015).

    distill("runs/tiny/final", "debug", "runs/data", overrides={"train.max_steps": 500})

    loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy(student, next token)

where p_T = softmax(logits / T). T^2 keeps the soft term's gradients on the scale of the hard term's
as T changes. The student trains through the ordinary training loop (train(cfg, loss_fn=...)), so
checkpoints, exact resume, logging, evaluation and DDP/FSDP work as in `lmforge pretrain`; the
validation loss it logs is the plain next-token loss, comparable with any other run. The teacher is
frozen, in eval mode, on every process's device; teacher and student must share the tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.outputs import check_not_input
from lmforge.utils import UserError


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 2.0,
    alpha: float = 0.5,
) -> torch.Tensor:
    """alpha T^2 KL(p_teacher,T || p_student,T) + (1 - alpha) CE, both means over the targets != -100.
    Logits (B, T, V), targets (B, T)."""
    V = student_logits.shape[-1]
    s = student_logits.float().reshape(-1, V)
    y = targets.reshape(-1)
    ce = F.cross_entropy(s, y, ignore_index=-100)
    if alpha == 0:
        return ce
    valid = y != -100
    log_s = F.log_softmax(s[valid] / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float().reshape(-1, V)[valid] / temperature, dim=-1)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")  # sum_v p_t (log p_t - log p_s)
    return alpha * temperature**2 * kl + (1 - alpha) * ce


def make_loss_fn(teacher, temperature: float, alpha: float):
    """A loss_fn(model, x, y) for lmforge.train.train that runs the (frozen) teacher alongside."""
    if not temperature > 0:
        raise UserError(f"--temperature {temperature}: must be positive")
    if not 0 <= alpha <= 1:
        raise UserError(f"--alpha {alpha}: must be between 0 and 1")
    teacher.eval().requires_grad_(False)

    def loss_fn(model, x, y):
        if teacher.tok_emb.weight.device != x.device:
            teacher.to(x.device)
        with torch.no_grad():
            t_logits = teacher(x)
        return distillation_loss(model(x), t_logits, y, temperature, alpha)

    return loss_fn


def _tokenizer_hash(path) -> str | None:
    p = Path(path)
    if not (p / "tokenizer.json").is_file():
        return None
    from lmforge.tokenizer import Tokenizer

    return Tokenizer.load(p).hash


def student_options(student: str, teacher_cfg) -> dict:
    """--student as run options: a checkpoint directory (init_from), or a preset `size` or `family:size`
    (family defaults to the teacher's)."""
    from lmforge.config import NAMED, SIZES

    if Path(student).is_dir():
        return {"model.init_from": student}
    family, _, size = student.rpartition(":")
    family = family or teacher_cfg.family
    if size not in SIZES and size not in NAMED:
        raise UserError(
            f"--student {student!r}: not a checkpoint directory, nor a preset size "
            f"({', '.join([*SIZES, *NAMED])}, optionally as family:size, e.g. llama:debug)"
        )
    return {"model.family": family, "model.size": size, "model.vocab_size": teacher_cfg.vocab_size}


def _student_name(student: str) -> str:
    """The run name's part for a student: llama:debug -> llama-debug; a checkpoint directory -> its run's
    name (runs/small/final and runs/small/checkpoints/step_000100 -> small), as training names runs."""
    p = Path(student)
    if not p.is_dir():
        return student.replace(":", "-")
    p = p.resolve()
    if p.name == "final":
        p = p.parent
    elif p.name.startswith("step_") and p.parent.name == "checkpoints":
        p = p.parent.parent
    return p.name


def distill(
    teacher,
    student: str,
    data,
    *,
    temperature: float = 2.0,
    alpha: float = 0.5,
    config=None,
    overrides: dict | None = None,
    eval_data: str | None = "python-docs",
    eval_tokens: int = 20_000,
    log=print,
) -> dict:
    """What `lmforge distill` does: train `student` (preset or checkpoint) on `data` against `teacher`,
    then compare teacher and student (size, bits per byte, decode speed). Returns the run summary with
    the comparison under "compare".

    Args:
        teacher: the teacher checkpoint directory (with its tokenizer)
        student: a checkpoint directory to start from, or a preset size (debug, tiny, small, ...)
            optionally with a family (llama:debug); a preset takes the teacher's family and vocabulary
        data: a `data prepare` directory tokenized with the teacher's tokenizer, or a source such as
            python-docs (prepared into the run directory) (default: --data.path)
        temperature: softmax temperature of both models
        alpha: weight of the distillation term; 1 - alpha goes to the next-token loss
        eval_data: source (or `data prepare` directory) whose validation split gives bits per byte before
            and after
        eval_tokens: tokens scored for bits per byte
    """
    from lmforge.checkpoint import load_model, read_config
    from lmforge.compress.prune import prepared_data
    from lmforge.train import train
    from lmforge.train.config import config_for_run

    tcfg = read_config(teacher)
    t_hash = _tokenizer_hash(teacher)
    if t_hash is None:
        raise UserError(
            f"--teacher {teacher}: has no tokenizer.json; distillation needs the teacher's tokenizer "
            "to check that the student and the data use the same one"
        )
    opts = student_options(student, tcfg)
    if "model.init_from" in opts:
        s_cfg = read_config(student)
        s_hash = _tokenizer_hash(student)
        if s_hash not in (None, t_hash) or s_cfg.vocab_size != tcfg.vocab_size:
            raise UserError(
                f"--student {student} and --teacher {teacher} do not share the tokenizer "
                f"(vocabulary {s_cfg.vocab_size} vs {tcfg.vocab_size}"
                + (", different tokenizer.json" if s_hash not in (None, t_hash) else "")
                + "); "
                "distillation compares their predictions token by token, so they must"
            )
    over = {**opts, **(overrides or {})}
    name = over.get("name") or f"distill-{_student_name(student)}"
    over["name"] = name
    run_dir = Path(over.get("out_dir", "runs")) / name
    # the run writes final/ and checkpoints/ there: never over the teacher or the student it reads
    check_not_input(run_dir, (teacher, student if "model.init_from" in opts else None), option="--name")
    if data is not None:
        over["data.path"] = prepared_data(data, teacher, run_dir / "data", log)
    over.setdefault("data.tokenizer", str(teacher))
    cfg = config_for_run(config, over, "pretrain")
    from lmforge.data.prepare import read_meta

    meta = read_meta(cfg.data.path) if cfg.data.path else None
    if meta is not None and meta.get("tokenizer_hash") not in (None, t_hash):
        raise UserError(
            f"--data {cfg.data.path} was tokenized with tokenizer {meta['tokenizer_hash']}, the teacher "
            f"uses {t_hash}: prepare the data with the teacher's tokenizer (or pass a source such as "
            "python-docs, which is prepared for you)"
        )
    t_model = load_model(teacher, device="cpu", dtype=torch.float32)
    log(f"distilling {teacher} into {student}: alpha {alpha}, temperature {temperature}")
    summary = train(cfg, loss_fn=make_loss_fn(t_model, temperature, alpha))
    if summary.get("final"):
        from lmforge.compress.summary import compare_models, format_summary

        r = compare_models(teacher, summary["final"], eval_data=eval_data, eval_tokens=eval_tokens)
        log(format_summary(r, labels=("teacher", "student")))
        summary["compare"] = r
    return summary
