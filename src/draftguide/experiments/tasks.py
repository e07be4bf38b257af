"""The built-in context-learning suite: a deterministic generator of tasks in CL-bench row format.

A row is a CL-bench row (`messages`, `rubrics`, `metadata` {task_id, context_id, context_category,
sub_category}) plus fields of ours: `reference_answer` (a short gold answer), `checks` (machine-checkable
rubrics, see `evaluate.score_checks`) and `distractor_answer` (the most tempting wrong answer: the
real-world fact a counterfactual overrides, or another item of the context).

Every task can only be solved from its context: counterfactual facts, invented rules, operators,
glossaries and procedures, data tables, multi-turn follow-ups, and a long document with the answer in
its middle. Answers are a word, a name or a number, and each question asks for the answer alone.
Difficulty is calibrated on greedy SmolLM2-135M-Instruct (the default target): short lists, a direct
question or the rule spelled out make some subcategories solvable by it, while others (an invented
operator, a multi-step procedure, state simulation, an observation log) stay near its floor; the measured
per-task solve status ships as `data/tasks_v1.greedy-smollm2-135m.results.jsonl`.
Rows come out interleaved by subcategory, so the first N rows (`--limit N`) cover every subcategory.
"""

from __future__ import annotations

import random
from pathlib import Path

from draftguide.errors import DraftGuideError

BUILTIN_FILE = "tasks_v1.jsonl"
BUILTIN_PARAMS = {"n_per_subcategory": 16, "seed": 0}  # how the frozen file was built

_SYL = [
    "zor",
    "vel",
    "quin",
    "ta",
    "mar",
    "bex",
    "lu",
    "dra",
    "fen",
    "oki",
    "sul",
    "ryn",
    "pax",
    "ith",
    "gor",
    "nel",
    "ska",
    "vo",
    "tre",
    "mib",
    "cal",
    "dun",
    "hesh",
    "ulo",
    "wim",
    "yar",
    "kes",
    "lo",
    "brin",
    "tha",
]
COLOURS = ["amber", "teal", "violet", "crimson", "ivory", "olive", "cobalt", "scarlet", "indigo", "magenta"]


def _word(rng: random.Random, taken: set[str], syllables: int = 2) -> str:
    """A made-up capitalised word, distinct from (and no substring of) everything in `taken`."""
    while True:
        w = "".join(rng.choice(_SYL) for _ in range(syllables)).capitalize()
        if all(w.lower() not in t.lower() and t.lower() not in w.lower() for t in taken):
            taken.add(w)
            return w


def _words(rng: random.Random, n: int, syllables: int = 2) -> list[str]:
    taken: set[str] = set()
    return [_word(rng, taken, syllables) for _ in range(n)]


def _a(word: str) -> str:
    return f"{'an' if word[0].lower() in 'aeiou' else 'a'} {word}"


def _number(n: int) -> str:
    """A regex matching the integer `n` on its own (not inside a longer number)."""
    return rf"(?<![\d.]){n}(?!\.?\d)"


def _first(answer: str, others) -> str:
    """A regex: `answer` is named before any of `others` (which may follow, e.g. "X, compared with Y")."""
    import re

    return rf"^(?:(?!{'|'.join(re.escape(o) for o in others)})[\s\S])*?{re.escape(answer)}"


def _task(
    context: str,
    question: str,
    answer,
    what: str,
    *,
    distractor,
    forbid=(),
    reject=(),
    pattern=None,
    history=(),
    first=False,
) -> dict:
    """One task: context as the system message, optional earlier (user, assistant) turns, the question.
    Checks: the answer appears (`pattern` as a regex if given) and no `forbid` string (a wrong answer) nor
    `reject` string (a negated or reversed statement of the answer, e.g. "does not") does; with `first`,
    the `forbid` strings may appear after the answer (the answer is the item named first)."""
    if first:
        pattern, forbid_checks = _first(str(answer), forbid), ()
    else:
        forbid_checks = forbid
    msgs = [{"role": "system", "content": context}]
    for u, a in history:
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    msgs.append({"role": "user", "content": question})
    checks = [{"type": "regex", "value": pattern} if pattern else {"type": "contains", "value": str(answer)}]
    checks += [{"type": "not_contains", "value": str(f)} for f in (*forbid_checks, *reject)]
    rubrics = [f"The response gives {answer} as {what}."]
    if forbid:
        rubrics.append(
            f"The response does not give {', '.join(map(str, forbid))} as {what}"
            + (f" (naming {answer} first)." if first else ".")
        )
    if reject:
        rubrics.append(f"The response does not negate or reverse {answer} as {what}.")
    rubrics.append("The response is short and answers only what was asked.")
    return {
        "messages": msgs,
        "rubrics": rubrics,
        "reference_answer": str(answer),
        "checks": checks,
        "distractor_answer": str(distractor),
    }


# -- Domain Knowledge Reasoning -------------------------------------------------------------------
_COUNTERFACTUALS = [  # (question, real answer, alternatives the context may assert, statement template)
    (
        "What is the capital of France?",
        "Paris",
        ["Lyon", "Marseille", "Bordeaux", "Nantes"],
        "the capital of France is {}",
    ),
    ("What is the capital of Japan?", "Tokyo", ["Osaka", "Kyoto", "Nagoya", "Sapporo"], "the capital of Japan is {}"),
    ("What is the capital of Italy?", "Rome", ["Milan", "Turin", "Naples", "Florence"], "the capital of Italy is {}"),
    (
        "Which planet is the largest in the solar system?",
        "Jupiter",
        ["Saturn", "Neptune", "Uranus"],
        "the largest planet in the solar system is {}",
    ),
    (
        "Who wrote the play Hamlet?",
        "Shakespeare",
        ["Marlowe", "Chaucer", "Milton"],
        "the play Hamlet was written by {}",
    ),
    ("What colour is the sky on a clear day?", "blue", ["green", "orange", "violet"], "the sky on a clear day is {}"),
    (
        "What is the tallest mountain on Earth?",
        "Everest",
        ["Kilimanjaro", "Denali", "Aconcagua"],
        "the tallest mountain on Earth is {}",
    ),
    (
        "Who was the first person to walk on the Moon?",
        "Armstrong",
        ["Gagarin", "Tereshkova", "Glenn"],
        "the first person to walk on the Moon was {}",
    ),
    (
        "What is the longest river in the world?",
        "Nile",
        ["Danube", "Thames", "Rhine"],
        "the longest river in the world is the {}",
    ),
    ("How many legs does a spider have?", "8", ["6", "10", "12"], "a spider has {} legs"),
    (
        "At how many degrees Celsius does water boil at sea level?",
        "100",
        ["70", "85", "120"],
        "water boils at {} degrees Celsius at sea level",
    ),
    ("How many days are there in a week?", "7", ["9", "5", "11"], "there are {} days in a week"),
]


def _counterfactual(rng: random.Random) -> dict:
    facts = rng.sample(_COUNTERFACTUALS, 5)
    chosen = [(q, real, rng.choice(alts), tpl) for q, real, alts, tpl in facts]
    lines = [f"- In this world, {tpl.format(new)}." for _, _, new, tpl in chosen]
    context = (
        "You are answering questions about an alternate world. The facts below are true in this world, "
        "even where they differ from what you know.\n" + "\n".join(lines)
    )
    q, real, new, _ = chosen[rng.randrange(5)]
    numeric = new.isdigit()
    return _task(
        context,
        f"{q} Answer with only the answer, according to the facts of this world.",
        new,
        "the answer",
        distractor=real,
        forbid=[real],
        pattern=_number(int(new)) if numeric else None,
    )


def _handbook(rng: random.Random) -> dict:
    name, drug = _words(rng, 2)
    condition, drug = name + " fever", drug.lower() + "ine"
    context = (
        "Treatment list of the Orvane clinical handbook (a fictional medical system; follow it, not real "
        f"medicine):\n- {condition}: treat with {drug}."
    )
    return _task(
        context,
        f"According to the handbook, which drug treats {condition}? Answer with only the drug name.",
        drug,
        "the drug",
        distractor="paracetamol",
        forbid=["paracetamol"],
    )


def _long_document(rng: random.Random) -> dict:
    n = 40
    ships = _words(rng, n)
    berths = rng.sample(range(100, 1000), n)
    crews = [rng.randrange(3, 30) for _ in range(n)]
    cargo = ["grain", "timber", "copper", "salt", "wool", "glass", "spices", "coal"]
    lines = [
        f"The ship {s} is moored at berth {b}; it carries {rng.choice(cargo)} and a crew of {c}."
        for s, b, c in zip(ships, berths, crews)
    ]
    context = "Harbour register of the port of Quellmar (all entries current):\n" + "\n".join(lines)
    i = rng.randrange(int(0.4 * n), int(0.6 * n))  # buried in the middle
    return _task(
        context,
        f"At which berth is the ship {ships[i]} moored? Answer with only the berth number.",
        berths[i],
        "the berth",
        distractor=berths[i + 1],
        pattern=_number(berths[i]),
    )


_ITEMS = ["books", "DVDs", "board games", "magazines", "maps", "tools", "music scores"]


def _follow_up(rng: random.Random) -> dict:
    items = rng.sample(_ITEMS, 2)
    days = rng.sample(range(3, 40), 2)
    lib = _words(rng, 1)[0]
    rule = [f"{it[0].upper() + it[1:]} may be borrowed for {d} days." for it, d in zip(items, days)]  # "DVDs" kept
    context = f"Lending rules of the {lib} community library:\n" + "\n".join(f"- {r}" for r in rule)
    a, b = rng.sample(range(2), 2)
    history = [(f"How many days can I borrow {items[a]} for?", rule[a])]
    return _task(
        context,
        f"And how many days can I borrow {items[b]} for? Answer with only the number of days.",
        days[b],
        "the loan period",
        distractor=days[a],
        pattern=_number(days[b]),
        history=history,
    )


# -- Rule System Application ----------------------------------------------------------------------
_OPERATORS = [
    ("2*a + b", lambda a, b: 2 * a + b),
    ("a*b + a", lambda a, b: a * b + a),
    ("a + 3*b", lambda a, b: a + 3 * b),
    ("a*a - b", lambda a, b: a * a - b),
    ("(a + b)*2", lambda a, b: (a + b) * 2),
    ("a*b - b", lambda a, b: a * b - b),
]


def _operator(rng: random.Random) -> dict:
    sym = rng.choice(["⊕", "◇", "⊗", "★", "▲"])
    text, f = rng.choice(_OPERATORS)
    a, b = rng.randrange(3, 10), rng.randrange(1, 10)  # a >= 3 keeps every result positive
    context = f"In this notebook a new operator is defined: for any numbers a and b, a {sym} b = {text}."
    result = f(a, b)
    wrong = next(w for w in (a + b, a * b, result + 1) if w != result)  # what a reader of the usual "+" or "*" says
    return _task(
        context,
        f"Compute {a} {sym} {b}. Answer with only the number.",
        result,
        "the result",
        distractor=wrong,
        pattern=_number(result),
    )


def _game(rng: random.Random) -> dict:
    pieces = [w.lower() for w in _words(rng, 3)]
    players = rng.sample(["Mara", "Tovin", "Edda", "Kasimir", "Olu", "Priya", "Sten", "Yara"], 2)
    beats = {pieces[0]: pieces[1], pieces[1]: pieces[2], pieces[2]: pieces[0]}
    rules = " ".join(f"{_a(x).capitalize()} captures {_a(y)}." for x, y in rng.sample(list(beats.items()), 3))
    context = f"Rules of the card game Trindle: each player shows one piece, and the capturing piece wins. {rules}"
    p, q = rng.sample(pieces, 2)
    winner, loser = (players[0], players[1]) if beats[p] == q else (players[1], players[0])
    return _task(
        context,
        f"{players[0]} shows {_a(p)} and {players[1]} shows {_a(q)}. Who wins? Answer with only the name.",
        winner,
        "the winner",
        distractor=loser,
        forbid=[loser],
    )


def _units(rng: random.Random) -> dict:
    big, small = [w.lower() for w in _words(rng, 2)]
    k, n = rng.randrange(3, 13), rng.randrange(2, 7)
    context = (
        f"Measures of the Zandorian standard: 1 {big} equals {k} {small}s. No other conversion applies. "
        f"To convert {big}s to {small}s, multiply the number of {big}s by {k}."
    )
    return _task(
        context,
        f"How many {small}s are there in {n} {big}s? Answer with only the number.",
        n * k,
        "the count",
        distractor=n + k,
        pattern=_number(n * k),
    )


_CONSTRUCTS = [
    "a loop",
    "a condition",
    "a function definition",
    "a variable declaration",
    "a return statement",
    "an import",
]


def _syntax(rng: random.Random) -> dict:
    lang = _words(rng, 1)[0]
    constructs = rng.sample(_CONSTRUCTS, 3)
    keys = [w.lower() for w in _words(rng, len(constructs))]
    lines = [f"- {c.capitalize()} starts with the keyword `{k}`." for c, k in zip(constructs, keys)]
    context = f"Reference of the {lang} programming language:\n" + "\n".join(lines)
    i = rng.randrange(len(constructs))
    others = [k for j, k in enumerate(keys) if j != i]
    return _task(
        context,
        f"In {lang}, which keyword starts {constructs[i]}? Answer with only the keyword.",
        keys[i],
        "the keyword",
        distractor=others[0],
        forbid=others,
        first=True,
    )


# -- Procedural Task Execution --------------------------------------------------------------------
def _steps(rng: random.Random) -> dict:
    colours = rng.sample(COLOURS, 3)
    device = _words(rng, 1)[0]
    lines = [f"{j + 1}. Press the {c} button." for j, c in enumerate(colours)]
    context = f"Reset procedure for the {device} K7 console (follow the steps in order):\n" + "\n".join(lines)
    k = rng.randrange(2)
    forbid = [c for j, c in enumerate(colours) if j not in (k, k + 1)]
    return _task(
        context,
        f"Which button do you press right after the {colours[k]} button? Answer with only the colour.",
        colours[k + 1],
        "the next button",
        distractor=colours[k - 1] if k else colours[k + 2],
        forbid=forbid,
        reject=[f"after the {colours[k + 1]}"],
    )  # the order reversed


def _apply_procedure(rng: random.Random) -> dict:
    start, add, mul, sub = rng.randrange(2, 10), rng.randrange(1, 6), rng.randrange(2, 4), rng.randrange(1, 6)
    result = (start + add) * mul - sub
    context = (
        "Procedure P-17 transforms a number:\n"
        f"Step 1: add {add}.\nStep 2: multiply the result by {mul}.\nStep 3: subtract {sub} from the result."
    )
    return _task(
        context,
        f"Apply procedure P-17 to the number {start}. Answer with only the final number.",
        result,
        "the final number",
        distractor=start + add * mul - sub,
        pattern=_number(result),
    )


_TOPICS = [
    ("billing", "says they were charged twice for one order"),
    ("sign-in", "cannot log in to their account"),
    ("delivery", "says their parcel has not arrived"),
    ("refunds", "wants their money back for a returned item"),
    ("privacy", "asks for their personal data to be deleted"),
    ("hardware", "reports that the device screen is cracked"),
]


def _routing(rng: random.Random) -> dict:
    topics = rng.sample(_TOPICS, 2)
    teams = ["team " + w for w in _words(rng, 2)]
    lines = [f"- {t.capitalize()} problems go to {team}." for (t, _), team in zip(topics, teams)]
    context = "Support routing rules of Halvard Ltd (every ticket goes to exactly one team):\n" + "\n".join(lines)
    i = rng.randrange(2)
    others = [tm.split()[1] for j, tm in enumerate(teams) if j != i]
    team = teams[i].split()[1]
    return _task(
        context,
        f"A customer has a {topics[i][0]} problem: the customer {topics[i][1]}. Which team gets the "
        "ticket? Answer with only the team name.",
        team,
        "the team",
        distractor=others[0],
        forbid=others,
        first=True,
    )


_SUBSTITUTES = [
    ("butter", ["ghee", "lard", "tallow"]),
    ("sugar", ["honey", "molasses", "treacle"]),
    ("milk", ["oat cream", "whey", "kefir"]),
    ("flour", ["chestnut meal", "rye meal", "acorn meal"]),
    ("salt", ["seaweed ash", "celery powder"]),
    ("eggs", ["flaxseed paste", "aquafaba"]),
    ("rice", ["barley", "millet", "spelt"]),
]


def _substitution(rng: random.Random) -> dict:
    chosen = [(orig, rng.choice(subs)) for orig, subs in rng.sample(_SUBSTITUTES, 2)]
    kitchen = _words(rng, 1)[0]
    lines = [f"- Wherever a recipe says {o}, use {s} instead." for o, s in chosen]
    context = f"House rules of the {kitchen} kitchen, applied to every recipe before cooking:\n" + "\n".join(lines)
    orig, sub = chosen[rng.randrange(2)]
    return _task(
        context,
        f"In this kitchen, which ingredient is used instead of {orig}? Answer with only the ingredient.",
        sub,
        "the ingredient",
        distractor=orig,
        forbid=[s for _, s in chosen if s != sub],
        first=True,
    )


# -- Empirical Discovery & Simulation -------------------------------------------------------------
def _table(rng: random.Random, n: int):
    samples = ["sample " + w for w in _words(rng, n)]
    temps = [rng.randrange(20, 90) for _ in range(n)]
    yields = rng.sample(range(11, 99), n)
    rows = "\n".join(f"| {s} | {t} | {y} |" for s, t, y in zip(samples, temps, yields))
    context = (
        "Results of the Ostrel fermentation experiment:\n| sample | temperature (C) | yield (g) |\n|---|---|---|\n"
        + rows
    )
    return context, samples, temps, yields


def _table_lookup(rng: random.Random) -> dict:
    context, samples, temps, yields = _table(rng, 2)
    i = rng.randrange(len(samples))
    wrong = temps[i] if temps[i] != yields[i] else yields[i - 1]  # the neighbouring column, or row
    return _task(
        context,
        f"What was the yield of {samples[i]}, in grams? Answer with only the number.",
        yields[i],
        "the yield",
        distractor=wrong,
        pattern=_number(yields[i]),
    )


def _table_compare(rng: random.Random) -> dict:
    context, samples, _, yields = _table(rng, 2)
    order = sorted(range(len(samples)), key=lambda j: -yields[j])
    names = [s.split()[1] for s in samples]
    best = names[order[0]]
    return _task(
        context,
        "Which sample had the higher yield? Answer with only the sample name.",
        best,
        "the sample",
        distractor=names[order[1]],
        forbid=[n for n in names if n != best],
        first=True,
    )


def _simulation(rng: random.Random) -> dict:
    cycle = rng.sample(COLOURS, 4)
    presses = rng.randrange(1, 4)
    start = rng.randrange(4)
    end = cycle[(start + presses) % 4]
    order = " -> ".join(cycle + [cycle[0]])
    context = (
        f"Simulator notes: a signal lamp cycles through colours in a fixed order, {order}, and so on. "
        "Each press of its switch moves it one colour forward in this order."
    )
    forbid = [c for c in cycle if c not in (end, cycle[start])]
    return _task(
        context,
        f"The lamp shows {cycle[start]}. The switch is pressed {presses} time{'s' * (presses > 1)}. "
        "Which colour does the lamp show now? Answer with only the colour.",
        end,
        "the colour",
        distractor=cycle[(start + 1) % 4] if presses > 1 else cycle[start],
        forbid=forbid,
    )


_OUTCOMES = [
    ("froze", r"fr[oe]z"),
    ("boiled", r"boil"),
    ("glowed", r"glow"),
    ("hissed", r"hiss"),
    ("sank", r"\bs[iau]nk"),
    ("fizzed", r"fizz"),
]


def _observations(rng: random.Random) -> dict:
    colours = rng.sample(COLOURS, 3)
    outcomes = rng.sample(_OUTCOMES, 3)
    log = [(c, o) for c, (o, _) in zip(colours, outcomes) for _ in range(2)]
    rng.shuffle(log)
    lines = [
        f"Trial {j + 1}: {_a(c)} crystal was dropped into the liquid; the liquid {o}." for j, (c, o) in enumerate(log)
    ]
    context = "Observation log of the Pellan lab (the crystals behave the same way every time):\n" + "\n".join(lines)
    i = rng.randrange(3)
    return _task(
        context,
        f"Based on the log, what does the liquid do when {_a(colours[i])} crystal is dropped in? Answer with one word.",
        outcomes[i][0],
        "the outcome",
        distractor=outcomes[(i + 1) % 3][0],
        forbid=[o for o, _ in outcomes if o != outcomes[i][0]],
        reject=["not ", "n't"],
        pattern=outcomes[i][1],
    )


CATEGORIES: dict[str, dict] = {
    "Domain Knowledge Reasoning": {
        "Counterfactual facts": _counterfactual,
        "Fictional handbook": _handbook,
        "Long document retrieval": _long_document,
        "Multi-turn follow-up": _follow_up,
    },
    "Rule System Application": {
        "Invented operator": _operator,
        "Game mechanics": _game,
        "Invented units": _units,
        "Programming syntax": _syntax,
    },
    "Procedural Task Execution": {
        "Instruction steps": _steps,
        "Apply a procedure": _apply_procedure,
        "Workflow routing": _routing,
        "Substitution rules": _substitution,
    },
    "Empirical Discovery & Simulation": {
        "Table lookup": _table_lookup,
        "Table comparison": _table_compare,
        "State simulation": _simulation,
        "Observation log": _observations,
    },
}


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def build_tasks(n_per_subcategory: int = 16, seed: int = 0) -> list[dict]:
    """`n_per_subcategory` tasks for each subcategory, the same for the same arguments on any machine.
    Task i of a subcategory does not depend on n, so a larger build extends a smaller one."""
    if n_per_subcategory < 1:
        raise DraftGuideError(f"n_per_subcategory must be >= 1, got {n_per_subcategory}")
    rows = []
    for i in range(n_per_subcategory):
        for cat, subs in CATEGORIES.items():
            for sub, make in subs.items():
                row = make(random.Random(f"{seed}:{sub}:{i}"))  # str seeds are stable across processes
                tid = f"dg{seed}-{_slug(sub)}-{i:03d}"
                row["metadata"] = {
                    "task_id": tid,
                    "context_id": f"{tid}-ctx",
                    "context_category": cat,
                    "sub_category": sub,
                }
                rows.append(
                    {
                        k: row[k]
                        for k in ("messages", "rubrics", "metadata", "reference_answer", "checks", "distractor_answer")
                    }
                )
    return rows


def write_tasks(rows: list[dict], path: str | Path) -> Path:
    from draftguide.reporting.runs import dumps

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def builtin_tasks_path() -> Path:
    return Path(__file__).resolve().parents[1] / "data" / BUILTIN_FILE


def load_builtin_tasks() -> list[dict]:
    """The frozen suite shipped with the package (`build_tasks(**BUILTIN_PARAMS)`)."""
    from draftguide.modeling.prompts import read_jsonl

    return read_jsonl(builtin_tasks_path())
