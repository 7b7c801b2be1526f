"""The parts copied on purpose between the three scripts (each file stands alone) must stay identical.

A fix made in one copy and not in the others fails here, with a message that names the part and the files.
"""

import ast
import difflib
import os

from conftest import ROOT

ALL = ("divo_continuous.py", "divo_antmaze.py", "pad_pretrain.py")
DIVO = ("divo_continuous.py", "divo_antmaze.py")
# Which top-level definitions each group of files shares, word for word.
SHARED = {
    ALL: (
        # networks and the diffusion model
        "mlp", "VectorizedLinear", "TwinCritic", "ValueNet", "SinusoidalEmbedding", "NoiseNet", "vp_beta_schedule",
        "Diffusion", "expectile_loss", "adam",
        # data semantics and the sample-quality diagnostics
        "qlearning_dataset", "normalize_states", "to_device", "sample_batch", "wasserstein_per_dim", "mmd_rbf",
        "sample_distances",
        # plumbing: checks, data files, checkpoints and resume, the training loop's helpers
        "InputError", "flag", "parse_args", "refuse_mismatch", "HDF5_COLUMNS", "default_dataset_path", "check_writable",
        "download", "load_d4rl_file", "dataset_fingerprint", "split_holdout", "save_checkpoint", "load_checkpoint",
        "make_run_dir", "write_json", "check_finite", "StopSignal", "GraphedTrainStep", "training_state",
        "progress_line", "networks", "optimizers", "agent_state", "load_agent_state",
        # plumbing: one writer per run folder, files that are final, names and numbers checked where they are made
        "resume_point", "clear_for_resume", "remove", "LOCK", "lock_run", "write_atomically", "log_scalars", "diverged",
        "MAX_NAME", "MAX_EXP_NAME", "is_folder_name", "schedule_is_finite", "MIN_TRANSITIONS", "check_transitions",
        # Minari datasets
        "is_minari_id", "parse_minari_id", "load_minari_dataset", "flatten_observations", "minari_rows", "minari_summary",
    ),
    DIVO: (
        "Actor", "adpo_target", "rms", "DIVO", "nearby_data_check", "Diagnostics", "ADPO_ONLY_ARGS", "run_mode",
        "task_name", "check_args", "restore_legacy_inertia", "restore_run", "CHECKPOINT", "FINISHED", "compile_updates",
        "make_minari_env",
    ),
    ("divo_antmaze.py", "pad_pretrain.py"): ("transform_rewards", "minari_dims"),
}


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
    for files, parts in SHARED.items():
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
    edited = sources["pad_pretrain.py"].replace("def split_holdout(", "def split_heldout(")
    assert drift({**sources, "pad_pretrain.py": edited}) == ["split_holdout: missing from pad_pretrain.py"]


def test_the_algorithm_sections_fit_on_a_projector():
    """From `class Args` to the plumbing banner, no line is longer than 100 columns."""
    for name, text in read_scripts().items():
        lines = text.splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("class Args"))
        end = next(i for i, line in enumerate(lines) if line.startswith("# Plumbing"))
        long = [f"{name}:{i + 1} ({len(line)} columns)" for i, line in enumerate(lines[start:end], start) if len(line) > 100]
        assert not long, "lines over 100 columns in the algorithm sections: " + ", ".join(long)
