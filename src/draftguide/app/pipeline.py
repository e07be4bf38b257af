"""`DraftGuide`: the object a notebook user reaches for first. A target, its tokenizer and a draft held
together, each method a thin layer over the functions the CLI runs:

    dg = DraftGuide.from_pretrained("smollm2-135m")        # load_target + resolve_draft
    dg.generate("Hi!", speculative=True).text               # speculative_generate / greedy / guided
    dg.adapt(context); ...; dg.reset()                      # ttt_adapt (test-time training of the draft)
    dg.diagnose("builtin", out="runs/diag")                 # run_diagnose

Calls are serialised by a lock, so one object can serve several threads (the server does).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, is_dataclass

import torch

from draftguide.errors import DraftGuideError
from draftguide.modeling.targets import DEFAULT_TARGET
from draftguide.modeling.text import TextStream, decode_text

METHODS = ("greedy", "speculative", "guided")
# keyword options generate() passes through to each method's function
METHOD_OPTIONS = {
    "greedy": (),
    "speculative": ("verify_len",),
    "guided": ("beta_schedule", "mix", "guard_top_k", "control", "verify_len"),
}


class Cancelled(Exception):
    """Raised by an `on_text` callback to abandon a generation (a client went away)."""


class _StopString(Exception):
    """Ends a generation from inside the decoding loop once a stop string has appeared."""


def load_pair(
    target: str = DEFAULT_TARGET,
    draft: str | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | None = "cpu",
    draft_dtype: str | torch.dtype | None = None,
):
    """Target, tokenizer and a draft checked against the target (None: the draft shipped for the target,
    'init[:N]': an untrained one). Returns `(target, tokenizer, draft)`. The draft runs in the target's dtype
    unless `draft_dtype` says otherwise: e.g. bfloat16 (the shipped draft's own precision) next to an fp32
    target on a CPU, where the draft's few-row matrix products are about 1.4x faster in bf16; features and
    head inputs are cast at the boundary."""

    from draftguide.modeling.draft_io import draft_path, resolve_draft
    from draftguide.modeling.targets import load_target

    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    draft_dtype = getattr(torch, draft_dtype) if isinstance(draft_dtype, str) else draft_dtype
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if draft and not str(draft).startswith("init") and not draft_path(draft).exists():
        raise DraftGuideError(f"draft folder '{draft}' does not exist")  # before a slow target load
    model, tok = load_target(target, dtype=dtype, device=device)
    d = resolve_draft(None if draft is None else str(draft), model, tok, target_name=str(target))
    d.to(device=device, dtype=draft_dtype or dtype)
    return model, tok, d


@dataclass
class Generation:
    text: str
    tokens: list[int]  # the new tokens (a final stop token included)
    prompt_tokens: int
    finish_reason: str  # "stop" (stop token or string) or "length"
    method: str
    stats: dict = field(default_factory=dict)  # seconds, tokens_per_s, tau (speculative), the method's own stats
    ttt: dict | None = None  # the TTT report when the draft was adapted for this request
    seed: int | None = None  # the seed the generation used (drawn fresh when none was given)
    logprobs: list[dict] | None = None  # per token of `text`, when asked for: see `target_logprobs`

    def __str__(self) -> str:
        return self.text


def _stats_dict(st) -> dict:
    if st is None:
        return {}
    d = (
        st.to_dict()
        if hasattr(st, "to_dict")
        else asdict(st)
        if is_dataclass(st)
        else dict(st)
        if isinstance(st, dict)
        else {}
    )
    if hasattr(st, "tau") and getattr(st, "acceptance_lengths", None):
        d["tau"] = st.tau
    if "flips" in d:
        d["n_flips"] = len(d["flips"])  # tokens where guidance changed the target's choice
    return d


class DraftGuide:
    """A target + tokenizer + draft. `draft` is the base draft unless `adapt` has swapped in an adapted one."""

    def __init__(self, target, tokenizer, draft, name: str = "draftguide"):
        self.target, self.tokenizer, self.draft, self.name = target, tokenizer, draft, name
        self._adapted = None
        self._lock = threading.RLock()

    @classmethod
    def from_pretrained(
        cls,
        target: str = DEFAULT_TARGET,
        draft: str | None = None,
        *,
        dtype: str | torch.dtype = "float32",
        device: str | None = "cpu",
        draft_dtype: str | torch.dtype | None = None,
    ) -> DraftGuide:
        """`target`: alias, local folder or hub id; `draft`: folder, 'init[:N]' or None (the shipped one);
        `draft_dtype`: see `load_pair`."""
        return cls(*load_pair(target, draft, dtype, device, draft_dtype), name=str(target))

    @property
    def device(self) -> torch.device:
        return next(self.target.parameters()).device

    # -- prompts ------------------------------------------------------------------------------------
    def encode(self, prompt, where: str | None = None, chat_template_kwargs: dict | None = None) -> torch.Tensor:
        """str -> one user turn through the chat template (raw text without one); list -> messages;
        dict -> a prompt-file row ({'prompt': raw text} or {'messages': [...]}); tensor -> ids. [1, T]
        `chat_template_kwargs`: template variables for this prompt (over the tokenizer's own, see
        `prompts.set_chat_template_kwargs`). Errors name `where` (default: the row's line/id, or 'prompt')."""
        from draftguide.modeling.prompts import encode_prompt

        ctk = chat_template_kwargs
        if isinstance(prompt, torch.Tensor):
            ids = prompt.reshape(1, -1)
        elif isinstance(prompt, dict):
            ids = encode_prompt(self.tokenizer, prompt, where, chat_template_kwargs=ctk)
        elif isinstance(prompt, list):
            ids = encode_prompt(self.tokenizer, {"messages": prompt}, where or "prompt", chat_template_kwargs=ctk)
        elif isinstance(prompt, str):
            chat = self.tokenizer.chat_template is not None
            ids = encode_prompt(
                self.tokenizer,
                {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt},
                where or "prompt",
                chat_template_kwargs=ctk,
            )
        else:
            raise DraftGuideError(
                f"prompt must be a string, a list of messages, a row dict or token ids, got {type(prompt).__name__}"
            )
        return ids.to(self.device)

    # -- test-time training -------------------------------------------------------------------------
    def adapt(self, context, **ttt):
        """Adapt the draft to `context` (text, messages or ids) with `ttt_adapt(**ttt)`; later calls use the
        adapted draft until `reset()`. Returns the TTT report (loss before/after, steps, seconds)."""
        try:
            from draftguide.training.ttt import ttt_adapt
        except ImportError as e:
            raise DraftGuideError(
                "test-time training is not available in this installation (draftguide.training.ttt)"
            ) from e
        from draftguide.modeling.prompts import check_length

        if isinstance(context, str):
            ids = torch.tensor([self.tokenizer(context)["input_ids"]], device=self.device)
        else:
            ids = self.encode(context)
        check_length(self.target, ids.shape[1], where="TTT context", what="context")
        with self._lock:
            self.reset()
            self._adapted = ttt_adapt(self.draft, self.target, ids, **ttt)
            self.draft = self._adapted
            return self._adapted.report

    def reset(self) -> None:
        """Back to the base draft (bit-identical weights)."""
        with self._lock:
            if self._adapted is not None:
                self.draft, self._adapted = self._adapted.reset(), None

    # -- generation ---------------------------------------------------------------------------------
    def generate(
        self,
        prompt,
        *,
        max_new_tokens: int = 256,
        method: str | None = None,
        beta: float = 0.0,
        speculative: bool = False,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stop: list[str] | str | None = None,
        seed: int | None = None,
        ttt: dict | bool | None = None,
        stream: bool = False,
        on_text: Callable[[str], None] | None = None,
        logprobs: bool = False,
        top_logprobs: int = 0,
        **options,
    ):
        """Decode a reply to `prompt` (see `encode`). `method`: greedy (the target alone), speculative
        (lossless, the same output faster when the draft is good), guided (target and draft logits mixed
        with weight `beta`; `speculative=True` for its exact block-verified variant); default: guided if
        beta else speculative if `speculative` else greedy. `ttt`: adapt the base draft on this prompt
        first (True or ttt_adapt options), reset after. `stream=True` returns an iterator of text pieces;
        otherwise a `Generation` (`on_text` still sees the pieces as they come). `seed`: None draws fresh
        randomness (recorded in `Generation.seed`), an integer reproduces. Temperatures below
        `sampling.GREEDY_BELOW` decode greedily. `logprobs`: also the target's log-probabilities of the output
        tokens, with `top_logprobs` (0..20) alternatives each (`target_logprobs`).
        A list of prompts (strings, message lists, row dicts or id tensors; a list of {role, content} dicts is one
        conversation) decodes them together (`batched.batch_generate`; each answer equals its batch-1 answer) and
        returns a list of `Generation`s, in order; `seed` then seeds every prompt alike. Speculative decoding and
        `ttt` run them one by one. `chat_template_kwargs`: template variables (e.g. {"enable_thinking": False})."""
        kw = dict(
            max_new_tokens=max_new_tokens,
            method=method,
            beta=beta,
            speculative=speculative,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            stop=stop,
            seed=seed,
            ttt=ttt,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            **options,
        )
        if is_prompt_list(prompt):
            if stream or on_text is not None:
                raise DraftGuideError(
                    "a list of prompts returns a list of Generations: stream / on_text take one prompt"
                )
            out = self.generate_jobs([Job(p, dict(kw)) for p in prompt])
            for r in out:
                if isinstance(r, BaseException):
                    raise r
            return out
        if stream:
            return self._stream(prompt, kw)
        return self._generate(prompt, on_text=on_text, **kw)

    def _stream(self, prompt, kw: dict) -> Iterator[str]:
        """Text pieces as they are decoded (in a worker thread); closing the iterator early stops decoding."""
        pieces: queue.Queue = queue.Queue()
        closed = threading.Event()
        done = object()

        def on_text(delta: str) -> None:
            if closed.is_set():
                raise Cancelled
            pieces.put(delta)

        def work() -> None:
            try:
                self._generate(prompt, on_text=on_text, **kw)
                pieces.put(done)
            except BaseException as e:  # handed to the consumer, raised there
                pieces.put(e)

        threading.Thread(target=work, daemon=True, name="draftguide-stream").start()
        try:
            while (item := pieces.get()) is not done:
                if isinstance(item, Cancelled):
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            closed.set()

    def _generate(
        self,
        prompt,
        *,
        max_new_tokens,
        method,
        beta,
        speculative,
        temperature,
        top_p,
        top_k,
        stop,
        seed,
        ttt,
        logprobs=False,
        top_logprobs=0,
        on_text=None,
        where=None,
        chat_template_kwargs=None,
        **options,
    ) -> Generation:
        from draftguide.modeling.prompts import check_length, stop_token_ids
        from draftguide.modeling.sampling import effective_temperature, resolve_seed

        method = check_generate(
            method=method,
            beta=beta,
            speculative=speculative,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            max_new_tokens=max_new_tokens,
            stop=stop,
            seed=seed,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            chat_template_kwargs=chat_template_kwargs,
            **options,
        )
        temperature, seed = effective_temperature(temperature), resolve_seed(seed)
        ids = self.encode(prompt, where, chat_template_kwargs)  # [1, T]
        check_length(self.target, ids.shape[1], max_new_tokens, where or "prompt")
        stop_ids = stop_token_ids(self.tokenizer, self.target)
        text = TextStream(self.tokenizer, stop_ids, [stop] if isinstance(stop, str) else list(stop or ()))

        def on_token(new: list[int]) -> None:
            delta = text.push(new)
            if delta and on_text:
                on_text(delta)
            if text.stop_hit and text.stop:
                raise _StopString

        with self._lock:
            if ttt and self._adapted is not None:
                raise DraftGuideError("the draft is already adapted (adapt()); call reset() first or drop ttt")
            report = self.adapt(ids, **({} if ttt is True else ttt)) if ttt else None
            try:
                t0 = time.perf_counter()
                st = None
                try:
                    _, st = self._decode(
                        method,
                        ids,
                        max_new_tokens,
                        beta,
                        speculative,
                        temperature,
                        top_p,
                        top_k,
                        stop_ids,
                        seed,
                        on_token,
                        options,
                    )
                except _StopString:
                    pass
                seconds = time.perf_counter() - t0
            finally:
                if ttt:
                    self.reset()
        tail = text.flush()
        if tail and on_text:
            on_text(tail)
        n = len(text.ids)
        stats = {"seconds": seconds, "tokens_per_s": n / seconds if seconds > 0 else None, **_stats_dict(st)}
        lp = None
        if logprobs:
            out = [t for t in text.ids if t not in stop_ids]  # a final stop token is not part of the text
            with self._lock:
                lp = target_logprobs(self.target, self.tokenizer, ids, out, top_logprobs)
        return Generation(
            text=text.text,
            tokens=text.ids,
            prompt_tokens=ids.shape[1],
            finish_reason="stop" if text.stop_hit else "length",
            method=method,
            stats=stats,
            ttt=_stats_dict(report) if report is not None else None,
            seed=seed,
            logprobs=lp,
        )

    @torch.inference_mode()
    def _decode(self, method, ids, n, beta, speculative, temperature, top_p, top_k, stop_ids, seed, on_token, options):
        """`temperature` is already effective (0 = greedy) and `seed` resolved."""
        from draftguide.decode.speculative import greedy_generate, speculative_generate

        gen = torch.Generator(device=ids.device).manual_seed(seed)
        if method == "greedy" and temperature == 0:
            return greedy_generate(self.target, ids, n, stop_ids, on_token=on_token)
        if method == "speculative":
            return speculative_generate(
                self.target,
                self.draft,
                ids,
                n,
                temperature,
                top_p,
                top_k,
                stop_ids,
                generator=gen,
                on_token=on_token,
                **options,
            )
        try:
            from draftguide.decode.guided import guided_generate
        except ImportError as e:
            what = "guided decoding" if method == "guided" else "sampling with method 'greedy' (use 'speculative')"
            raise DraftGuideError(f"{what} is not available in this installation (draftguide.decode.guided)") from e
        # beta = 0 is the target alone: plain sampling at temperature > 0
        return guided_generate(
            self.target,
            self.draft,
            ids,
            beta=beta,
            max_new_tokens=n,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            stop_token_ids=stop_ids,
            speculative=speculative,
            generator=gen,
            on_token=lambda t: on_token([t]),
            **options,
        )

    # -- many prompts at once -----------------------------------------------------------------------
    def generate_jobs(self, jobs: list[Job]) -> list[Generation | BaseException]:
        """Decode several generate() calls together: jobs that the batched loop supports (greedy, sampling and
        guided decoding without speculative or ttt) and share the guidance settings go in one batch, each with
        its own sampling parameters, seed, token budget, stop strings and `on_text`; the others run alone.
        Returns a Generation per job, or the exception that job raised (one job's failure is not the others')."""
        results: list = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            try:
                key = self._batch_key(job.kw)
            except DraftGuideError as e:
                results[i] = e
                continue
            if key is None:
                groups.setdefault(("alone", i), []).append(i)
            else:
                groups.setdefault(key, []).append(i)
        for key, idx in groups.items():
            if key[0] == "alone" or len(idx) == 1:  # one job: the batch-1 loop
                i = idx[0]
                try:
                    results[i] = self.generate(jobs[i].prompt, on_text=jobs[i].on_text, **jobs[i].kw)
                except BaseException as e:  # noqa: BLE001  (handed to the caller)
                    results[i] = e
                continue
            for i, r in zip(idx, self._generate_batch([jobs[i] for i in idx])):
                results[i] = r
        return results

    @staticmethod
    def _batch_key(kw: dict) -> tuple | None:
        """The guidance settings rows must share to be decoded together, or None when the job runs alone."""
        method = check_generate(**kw)
        if method == "speculative" or kw.get("speculative") or kw.get("ttt"):
            return None
        beta = float(kw.get("beta") or 0.0)
        if method == "greedy" or beta == 0:  # the target alone: plain greedy / sampling
            return ("plain",)
        return (
            "guided",
            beta,
            kw.get("mix", "logits"),
            kw.get("beta_schedule", "fixed"),
            kw.get("guard_top_k"),
            kw.get("control"),
        )

    def _generate_batch(self, jobs: list[Job]) -> list[Generation | BaseException]:
        from draftguide.decode.batched import batch_generate
        from draftguide.modeling.prompts import check_length, stop_token_ids
        from draftguide.modeling.sampling import effective_temperature, resolve_seed

        out: list = [None] * len(jobs)
        rows = []  # (job index, ids, temperature, seed, TextStream)
        stop_ids = stop_token_ids(self.tokenizer, self.target)
        for i, job in enumerate(jobs):
            kw = job.kw
            try:
                ids = self.encode(job.prompt, kw.get("where"), kw.get("chat_template_kwargs"))
                check_length(self.target, ids.shape[1], kw["max_new_tokens"], kw.get("where") or "prompt")
            except DraftGuideError as e:
                out[i] = e
                continue
            stop = kw.get("stop")
            text = TextStream(self.tokenizer, stop_ids, [stop] if isinstance(stop, str) else list(stop or ()))
            rows.append((i, ids, effective_temperature(kw.get("temperature", 0.0)), resolve_seed(kw.get("seed")), text))
        if not rows:
            return out
        gone: set[int] = set()

        def on_token(r: int, tok: int) -> bool:
            i, _, _, _, text = rows[r]
            delta = text.push([tok])
            if delta and jobs[i].on_text is not None and r not in gone:
                try:
                    jobs[i].on_text(delta)
                except Cancelled:  # that client went away: its row ends, the others go on
                    gone.add(r)
                    return True
            return bool(text.stop_hit and text.stop)

        k0 = jobs[rows[0][0]].kw
        guided = self._batch_key(k0)[0] == "guided"
        opts = {k: k0[k] for k in ("mix", "beta_schedule", "guard_top_k", "control") if k0.get(k) is not None}
        with self._lock:
            t0 = time.perf_counter()
            res = batch_generate(
                self.target,
                [r[1] for r in rows],
                [jobs[r[0]].kw["max_new_tokens"] for r in rows],
                stop_token_ids=stop_ids,
                temperature=[r[2] for r in rows],
                top_p=[jobs[r[0]].kw.get("top_p", 1.0) for r in rows],
                top_k=[jobs[r[0]].kw.get("top_k", 0) for r in rows],
                generators=[torch.Generator(device=r[1].device).manual_seed(r[3]) for r in rows],
                draft=self.draft if guided else None,
                beta=float(k0.get("beta") or 0.0) if guided else 0.0,
                on_token=on_token,
                **(opts if guided else {}),
            )
            wall = time.perf_counter() - t0
        for ri, ((i, ids, _, seed, text), r) in enumerate(zip(rows, res)):
            kw = jobs[i].kw
            tail = text.flush()
            if tail and jobs[i].on_text is not None and ri not in gone:
                try:
                    jobs[i].on_text(tail)
                except Cancelled:
                    pass
            seconds = r.stats.total_s
            n = len(text.ids)
            stats = {
                "seconds": seconds,
                "tokens_per_s": n / seconds if seconds > 0 else None,
                "batch_size": len(rows),
                "batch_seconds": wall,
                **_stats_dict(r.stats),
            }
            lp = None
            if kw.get("logprobs"):
                new = [t for t in text.ids if t not in stop_ids]
                with self._lock:
                    lp = target_logprobs(self.target, self.tokenizer, ids, new, kw.get("top_logprobs", 0))
            method = resolve_method(kw.get("method"), kw.get("beta", 0.0), kw.get("speculative", False))
            out[i] = Generation(
                text=text.text,
                tokens=text.ids,
                prompt_tokens=ids.shape[1],
                finish_reason="stop" if text.stop_hit else "length",
                method=method,
                stats=stats,
                seed=seed,
                logprobs=lp,
            )
        return out

    # -- the readout diagnostic ---------------------------------------------------------------------
    def diagnose(
        self,
        tasks="builtin",
        out: str = "runs/diagnose",
        *,
        modes=("next", "block"),
        limit: int | None = None,
        solved_from: str | None = None,
        controls: bool = True,
        ttt: dict | bool | None = None,
        n_boot: int = 1000,
        seed: int = 0,
        progress: bool = True,
    ) -> dict:
        """`draftguide diagnose` on `tasks` ('builtin', a JSONL path or a list of task rows) with the current
        draft (adapted or not); `ttt` (True or TTTConfig fields): also the draft adapted on each task's context,
        as `diagnose --ttt`. Writes the run folder `out` and returns its summary."""
        from draftguide.experiments.diagnose import results_field, run_diagnose
        from draftguide.experiments.diagnose import solved_from as read_solved
        from draftguide.experiments.diagnostic import DEFAULT_CONTROLS
        from draftguide.experiments.evaluate import load_tasks

        rows = load_tasks(tasks)[0] if isinstance(tasks, str) else list(tasks)
        config = None
        if ttt:
            from draftguide.training.ttt import TTTConfig

            config = TTTConfig(**({} if ttt is True else ttt)).validate()
        with self._lock:
            return run_diagnose(
                self.target,
                self.tokenizer,
                self.draft,
                rows[:limit],
                out,
                modes=list(modes),
                controls=DEFAULT_CONTROLS if controls else (),
                solved=read_solved(solved_from) if solved_from else None,
                responses=results_field(solved_from, "response") if solved_from else None,
                n_boot=n_boot,
                seed=seed,
                progress=progress,
                ttt=config,
                command=f"DraftGuide.from_pretrained({self.name!r}).diagnose("
                f"{tasks if isinstance(tasks, str) else '<rows>'!r}, out={str(out)!r})",
                settings={
                    "target": self.name,
                    "tasks": tasks if isinstance(tasks, str) else "(rows)",
                    "modes": list(modes),
                    "limit": limit,
                    "solved_from": solved_from,
                    "adapted": self._adapted is not None,
                    "ttt": None if config is None else asdict(config),
                },
            )


@dataclass
class Job:
    """One generate() call for `DraftGuide.generate_jobs`: the prompt, generate()'s keyword options and an
    optional `on_text` (streaming; raising `Cancelled` ends this job only)."""

    prompt: object
    kw: dict
    on_text: Callable[[str], None] | None = None


def is_prompt_list(prompt) -> bool:
    """A list of prompts (not one conversation: a list of {role, ...} dicts)."""
    if not isinstance(prompt, (list, tuple)) or not prompt:
        return False
    return not all(isinstance(m, dict) and "role" in m for m in prompt)


MAX_TOP_LOGPROBS = 20  # as the OpenAI API


def check_generate(
    *,
    method=None,
    beta=0.0,
    speculative=False,
    temperature=0.0,
    top_p=1.0,
    top_k=0,
    max_new_tokens=1,
    stop=None,
    seed=None,
    ttt=None,
    logprobs=False,
    top_logprobs=0,
    chat_template_kwargs=None,
    **options,
) -> str:
    """Every generate() option checked before any work; returns the method that will run."""
    from draftguide.modeling.prompts import check_chat_template_kwargs
    from draftguide.modeling.sampling import check_sampling, resolve_seed

    check_chat_template_kwargs(chat_template_kwargs)
    method = resolve_method(method, beta, speculative)
    check_sampling(temperature, top_p, top_k)
    if seed is not None:
        resolve_seed(seed)
    if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int) or not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise DraftGuideError(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {top_logprobs!r}")
    if top_logprobs and not logprobs:
        raise DraftGuideError("top_logprobs needs logprobs = true")
    bad = sorted(set(options) - set(METHOD_OPTIONS[method]))
    if bad:
        raise DraftGuideError(
            f"{', '.join(bad)}: not an option of method {method!r} "
            f"(it takes {', '.join(METHOD_OPTIONS[method]) or 'none'})"
        )
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise DraftGuideError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    return method


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The bytes a token stands for: exact for byte-level BPE (GPT-2 style) and SentencePiece byte-fallback
    (`<0xAB>`) tokens, else the UTF-8 of its decoded text. A token may hold part of a multi-byte character."""
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    if isinstance(piece, str):
        if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        dec = _byte_decoder()
        if piece and _byte_level(tokenizer) and all(c in dec for c in piece):
            return bytes(dec[c] for c in piece)
    return tokenizer.decode([int(token_id)]).encode("utf-8")


def _byte_level(tokenizer) -> bool:
    """Whether a fast tokenizer decodes with GPT-2's byte-level mapping."""
    try:
        return "ByteLevel" in tokenizer.backend_tokenizer.decoder.__getstate__().decode()
    except Exception:
        return False


_BYTE_DECODER: dict | None = None


def _byte_decoder() -> dict:
    global _BYTE_DECODER
    if _BYTE_DECODER is None:  # GPT-2's bytes_to_unicode, inverted
        bs = (
            list(range(ord("!"), ord("~") + 1))
            + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1))
        )
        cs, n = bs[:], 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        _BYTE_DECODER = {chr(c): b for b, c in zip(bs, cs)}
    return _BYTE_DECODER


@torch.inference_mode()
def target_logprobs(target, tokenizer, prompt_ids: torch.Tensor, new_tokens: list[int], top: int = 0) -> list[dict]:
    """The target's own log-probabilities of `new_tokens` after `prompt_ids` (one teacher-forced forward):
    the raw next-token distribution, log_softmax of the logits at temperature 1, before any top-k/top-p
    filter and before guidance, whichever method chose the tokens (OpenAI and vLLM report them so too). Per
    token, in the OpenAI chat format: {token, logprob, bytes, top_logprobs: [{token, logprob, bytes}] (the
    `top` most likely, best first)}."""
    if not new_tokens:
        return []
    dev, n = prompt_ids.device, len(new_tokens)
    seq = torch.cat([prompt_ids.reshape(1, -1), torch.tensor([new_tokens], device=dev)], 1)
    logits = target(seq[:, :-1], logits_to_keep=n).logits[0, -n:]  # [n, V]
    logp = torch.log_softmax(logits.float(), -1)
    chosen = logp.gather(-1, torch.tensor(new_tokens, device=dev)[:, None])[:, 0].tolist()
    tops = logp.topk(top, -1) if top else None

    def entry(tid: int, value: float) -> dict:
        b = token_bytes(tokenizer, tid)
        return {"token": b.decode("utf-8", errors="replace"), "logprob": max(value, -9999.0), "bytes": list(b)}

    rows = []
    for i, tid in enumerate(new_tokens):
        alts = [] if tops is None else [entry(j, v) for v, j in zip(tops.values[i].tolist(), tops.indices[i].tolist())]
        rows.append(entry(tid, chosen[i]) | {"top_logprobs": alts})
    return rows


def resolve_method(method: str | None, beta: float, speculative: bool) -> str:
    if method is None:
        method = "guided" if beta else "speculative" if speculative else "greedy"
    if method not in METHODS:
        raise DraftGuideError(f"unknown method {method!r} (expected one of {', '.join(METHODS)})")
    if method == "greedy" and speculative:
        method = "speculative"  # the same output, faster when the draft is good
    if beta and method != "guided":
        raise DraftGuideError(f"beta = {beta} needs method 'guided', not {method!r}")
    if not 0.0 <= float(beta) <= 1.0:
        raise DraftGuideError(f"beta must be in [0, 1], got {beta}")
    return method


__all__ = [
    "DraftGuide",
    "Generation",
    "Job",
    "is_prompt_list",
    "METHODS",
    "METHOD_OPTIONS",
    "check_generate",
    "TextStream",
    "decode_text",
    "load_pair",
    "resolve_method",
    "target_logprobs",
]
