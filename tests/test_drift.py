"""The algorithm, copied on purpose between the three scripts (each script holds all of DIVO, as a CleanRL file does),
must stay identical in every copy: the networks, the diffusion model, the losses, DIVO's iteration and the data
semantics, and nothing else. The infrastructure around them (argument checks, optimisers' construction, run
management) lives once, in divo_utils/, and is not copied back.

A fix made in one copy and not in the others fails here, with a message that names the part and the files.
"""

import ast
import difflib
import os

from conftest import ROOT

ALL = ("divo_continuous.py", "divo_antmaze.py", "pad_pretrain.py")
DIVO = ("divo_continuous.py", "divo_antmaze.py")
# The algorithm: which top-level definitions each group of files shares, word for word.
ALGORITHM = {
    ALL: (
        # networks and the diffusion model
        "mlp", "VectorizedLinear", "TwinCritic", "ValueNet", "SinusoidalEmbedding", "NoiseNet", "vp_beta_schedule",
        "Diffusion", "expectile_loss",
        # data semantics: D4RL's transitions, the state normalisation, the data on the device, batches
        "qlearning_dataset", "normalize_states", "to_device", "prepare_data", "sample_batch",
    ),
    # DIVO itself: the actor, eq. (12), one iteration
    DIVO: ("Actor", "adpo_target", "DIVO"),
    # AntMaze's reward, learned from by divo_antmaze.py and by pad_pretrain.py's AntMaze pretraining
    ("divo_antmaze.py", "pad_pretrain.py"): ("transform_rewards",),
}
UTILS = ("__init__", "files", "args", "runs", "resume", "data", "envs", "speed", "diagnostics", "video")


def definitions(source: str) -> dict[str, str]:
    """The source text of every top-level class, function and assignment, by name (decorators included)."""
    lines = source.splitlines(keepends=True)
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            name = node.name
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
        else:
            continue
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 1
        found[name] = "".join(lines[start:node.end_lineno])
    return found


def drift(sources: dict[str, str]) -> list[str]:
    """One message per shared part whose copies differ (or is missing), with the first lines of the difference."""
    parsed = {name: definitions(text) for name, text in sources.items()}
    problems = []
    for files, parts in ALGORITHM.items():
        reference = files[0]
        for part in parts:
            for other in files:
                if part not in parsed[other]:
                    problems.append(f"{part}: missing from {other}")
                    continue
                if other == reference or parsed[other][part] == parsed[reference].get(part):
                    continue
                diff = difflib.unified_diff(parsed[reference].get(part, "").splitlines(), parsed[other][part].splitlines(),
                                            reference, other, lineterm="", n=0)
                problems.append(f"{part}: {other} differs from {reference}\n" + "\n".join(list(diff)[:12]))
    return problems


def read_scripts() -> dict[str, str]:
    return {name: open(os.path.join(ROOT, name)).read() for name in ALL}


def test_copied_parts_are_identical_in_every_script():
    problems = drift(read_scripts())
    assert not problems, "copies drifted apart; make the same change in every copy:\n\n" + "\n\n".join(problems)


def test_an_edit_to_one_copy_of_the_sampler_is_caught():
    sources = read_scripts()
    edited = sources["divo_antmaze.py"].replace("a = a + self.posterior_std[k] * noise[k - 1]",
                                                "a = a + self.posterior_std[k] * noise[k]")
    assert edited != sources["divo_antmaze.py"]
    problems = drift({**sources, "divo_antmaze.py": edited})
    assert len(problems) == 1 and problems[0].startswith("Diffusion: divo_antmaze.py differs from divo_continuous.py")
    assert "noise[k]" in problems[0]


def test_a_part_missing_from_one_script_is_caught():
    sources = read_scripts()
    edited = sources["pad_pretrain.py"].replace("def prepare_data(", "def prepare_dataset(")
    assert edited != sources["pad_pretrain.py"]
    assert drift({**sources, "pad_pretrain.py": edited}) == ["prepare_data: missing from pad_pretrain.py"]


def test_an_edit_to_one_copy_of_eq_12_is_caught():
    sources = read_scripts()
    edited = sources["divo_continuous.py"].replace("generated = score >= adv", "generated = score > adv")
    assert edited != sources["divo_continuous.py"]
    problems = drift({**sources, "divo_continuous.py": edited})
    assert len(problems) == 1 and problems[0].startswith("adpo_target: divo_antmaze.py differs from divo_continuous.py")


def identical_parts(sources: dict[str, str]) -> dict[str, set[str]]:
    """Every top-level definition whose text is the same in two or more scripts, with the scripts that hold it."""
    parsed = {name: definitions(text) for name, text in sources.items()}
    copies = {}
    for part in set().union(*parsed.values()):
        texts = [parsed[name].get(part) for name in ALL]
        for name, text in zip(ALL, texts):
            if text is not None and texts.count(text) > 1:
                copies.setdefault(part, set()).add(name)
    return copies


def test_algorithm_lists_exactly_the_copied_parts():
    """Every part copied word for word between scripts is guarded above (a new copy is listed, or written once in
    divo_utils), and every listed part is still there in each of its scripts (a part that stopped being copied
    leaves the list)."""
    listed = {part: set(files) for files, parts in ALGORITHM.items() for part in parts}
    assert sum(len(parts) for parts in ALGORITHM.values()) == len(listed), "a part is listed twice"
    assert identical_parts(read_scripts()) == listed


def test_no_script_defines_what_divo_utils_holds():
    """The infrastructure lives once, in divo_utils: a script that defines one of its top-level names again holds a
    second copy that nothing here would keep in step with the first (a script may import the name)."""
    utils = set()
    for module in UTILS:
        utils |= set(definitions(open(os.path.join(ROOT, "divo_utils", f"{module}.py")).read()))
    assert "GraphedTrainStep" in utils and "load_task" in utils and "Diagnostics" in utils  # the helper sees them
    for name, text in read_scripts().items():
        again = sorted(set(definitions(text)) & utils)
        assert not again, f"{name} defines again what divo_utils holds: {', '.join(again)}"


def long_lines(sources: dict[str, str]) -> list[str]:
    """file:line (columns) of every line longer than 100 columns."""
    return [f"{name}:{i} ({len(line)} columns)" for name, text in sources.items()
            for i, line in enumerate(text.splitlines(), 1) if len(line) > 100]


def test_the_scripts_fit_on_a_projector():
    """No line of the three scripts (the whole file, main block included) is longer than 100 columns."""
    sources = read_scripts()
    long = long_lines(sources)
    assert not long, "lines over 100 columns: " + ", ".join(long)
    edited = sources["pad_pretrain.py"] + "#" * 101 + "\n"  # after the main block: the last line counts too
    assert long_lines({**sources, "pad_pretrain.py": edited}) == [
        f"pad_pretrain.py:{len(edited.splitlines())} (101 columns)"]
