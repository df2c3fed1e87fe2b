"""The first code cell of every notebook: one line that makes a run by hand behave like the runner's.

    params = start("hh_rlhf", globals())

- the kernel moves to the repository root (`raftsuite.paths`: found from where the notebook is);
- run by hand (`run_by = "hand"`, the parameters cell's default), the profile the cell names is applied from
  notebooks/profiles.yaml over the cell's values, so `profile = "smoke"` means the smoke profile; under the
  runner (`run_by = "runner"`, which it injects) papermill already did that;
- every value is checked against the notebook's parameters before anything runs (a typo names the key);
- by hand, results and runs go under runs/<profile>/<notebook>/, never into the committed results/;
- logging is set up (raftlib's per-iteration lines shown, library noise filtered), and the expected run time of
  this profile on this machine is printed (from the last committed run's status.json).

Returns the parameters as a read-only record (`params.samples_per_prompt`); the globals are updated as well, so
later cells read either.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any

from raftsuite import paths


class Parameters(Mapping[str, Any]):
    """A notebook's parameters, read-only, by key or attribute."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self._values = dict(values)

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __getattr__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(f"no parameter {key!r}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Parameters({self._values!r})"

    def __or__(self, other: Mapping[str, Any]) -> Parameters:
        """These parameters with some values replaced (`params | {"temperature": 1.0}`)."""
        return Parameters(self._values | dict(other))


def expected_minutes(profile: str, name: str) -> float | None:
    """The wall time of the last committed run of this notebook under this profile (results/.../status.json)."""
    status = Path("results") / profile / name / "status.json"
    if not status.is_file():
        return None
    return json.loads(status.read_text()).get("seconds", 0.0) / 60


def expected_time(profile: str, name: str) -> str:
    """What `start` prints about run time: the committed run's wall time, and for a notebook that reuses an
    earlier one's work (`runner.SHARED_WORK`: the HH setup and method runs), that it took so little only because
    the earlier ones had run; with an empty cache it first makes their part."""
    from raftsuite import runner

    minutes = expected_minutes(profile, name)
    if minutes is None:
        return f"no committed {profile} run to time it by"
    took = f"the committed run took {minutes:.1f} min" if minutes < 10 else f"the committed run took {minutes:.0f} min"
    group = next((g for g in runner.SHARED_WORK if name in g), ())
    before = list(group[: group.index(name)]) if group else []
    if before:
        earlier = ", ".join(f"{o} {m:.0f} min" for o in before if (m := expected_minutes(profile, o)) is not None)
        took += f" after {', '.join(before)} had run"
        if earlier:  # an earlier notebook with no committed run has no part to add
            took += f" (with an empty runs/ cache add their part: {earlier})"
    return took + " on the suite's 2-core machine"


def profile_overrides(
    cell: Mapping[str, Any], defaults: Mapping[str, Any], profile_values: Mapping[str, Any]
) -> list[str]:
    """The values a by-hand run edited in the parameters cell that the profile then replaces (`key: edit -> value`)."""
    return [
        f"{key}: {cell[key]!r} -> {value!r}"
        for key, value in profile_values.items()
        if key in cell and cell[key] != defaults.get(key) and cell[key] != value
    ]


def start(name: str, namespace: MutableMapping[str, Any]) -> Parameters:
    """See the module docstring. `namespace` is the notebook's `globals()`."""
    from raftsuite import runner

    root = paths.at_repo_root()
    runner.use_root(root)  # this checkout's notebooks and profiles, not those of wherever raftsuite is installed
    defaults = runner.notebook_parameters(name)
    cell = {key: namespace[key] for key in defaults if key in namespace}
    profile = cell.get("profile", "tiny")
    if cell.get("run_by", "hand") != "runner":
        values = runner.check_parameters(name, dict(runner.load_profile(profile).get(name, {})), f"profile {profile!r}")
        replaced = profile_overrides(cell, defaults, values)
        if replaced:  # an edit the profile overrides would otherwise vanish without a word
            print(
                f"profile {profile} replaces what this cell set: {'; '.join(replaced)} (to keep an edit, set it in notebooks/profiles.yaml or pass it to the runner with -p)"
            )
        cell |= values
        cell["output_dir"] = cell.get("output_dir") or f"runs/{profile}/{name}/report"
        cell["work_dir"] = cell.get("work_dir") or f"runs/{profile}/{name}"
    runner.check_parameters(name, cell, f"notebooks/{name}.ipynb")
    namespace.update(cell)
    _quiet_logs(cell.get("show_progress", True))
    print(f"{name}, profile {profile} ({cell.get('run_by', 'hand')}); {expected_time(profile, name)}")
    print(f"results in {cell['output_dir']}")
    print(f"repository: {root}")
    return Parameters(cell)


def _quiet_logs(progress: bool) -> None:
    import transformers

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("raftlib").setLevel(logging.INFO)
    logging.getLogger("raftsuite").setLevel(logging.INFO)
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices of transformers 5.x, not ours
    transformers.logging.set_verbosity_error()  # e.g. "score.weight newly initialized": expected for a new head
    if not progress:
        transformers.utils.logging.disable_progress_bar()
