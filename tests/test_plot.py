"""plot_training_curves: whole-epoch ticks, the end of a warm start marked, ESS and tail-index
panels, and statistics a phase does not have left out rather than drawn as zeros."""

import numpy as np

from vaeml_jax import plot


def _records():
    warm = dict(phase="warm_start", meeting_time_mean=None, meeting_time_max=None,
                capped_fraction=None, tail_index=None)  # fmt: skip
    main = dict(phase="main", meeting_time_mean=6.0, meeting_time_max=90, capped_fraction=0.0,
                tail_index=1.3)  # fmt: skip
    return [
        dict(
            epoch=e,
            objective=-150.0 + e,
            ess_mean=1.5,
            examples_per_second=500.0,
            **(warm if e <= 2 else main),
        )  # fmt: skip
        for e in (1, 2, 3)
    ]


def test_curves_have_integer_epochs_the_phase_boundary_ess_and_tail_index(tmp_path, monkeypatch):
    figs = []
    monkeypatch.setattr(plot, "_save", lambda fig, path: figs.append(fig) or path)
    plot.plot_training_curves(_records(), tmp_path / "curves.png")
    (fig,) = figs
    titles = [ax.get_title() for ax in fig.axes]
    assert any("effective sample size" in t for t in titles)
    assert any("tail" in t for t in titles)
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), (ax.get_title(), ticks)
        marks = [ln for ln in ax.get_lines() if ln.get_label() == "warm start ends"]
        assert len(marks) == 1 and marks[0].get_xdata()[0] == 2.5
    meeting = next(ax for ax in fig.axes if "meeting time" in ax.get_title())
    mean = next(ln for ln in meeting.get_lines() if ln.get_label() == "mean")
    y = np.asarray(mean.get_ydata(), float)
    assert np.isnan(y[:2]).all() and y[2] == 6.0  # no false zeros for the warm start


def test_curves_are_written_as_png(tmp_path):
    path = plot.plot_training_curves(_records(), tmp_path / "curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
