"""The silero-vad suite: the fp32 detector hears the ALSA voices and not the gaps or the noise clip."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from vqcompress.errors import VQCError
from vqcompress.suites import silero

if importlib.util.find_spec("silero_vad") is None or not list(silero.CLIPS.glob("*.wav")):
    pytest.skip("silero-vad or alsa-utils' clips are not installed (make setup)", allow_module_level=True)


@pytest.fixture(scope="module")
def vad():
    from vqcompress.models.pretrained import load_pretrained

    return load_pretrained("silero-vad")


def test_voices_are_speech_and_the_noise_clip_is_not(vad):
    names = sorted(p.name for p in silero.CLIPS.glob("*.wav"))
    decided = silero.probabilities(vad, silero.audio()) > 0.5
    starts, at = [], 0
    for name in names:
        length = len(silero._read(silero.CLIPS / name))
        starts.append((name, at // silero.WINDOW, (at + length) // silero.WINDOW))
        at += length + silero.GAP
    for name, first, last in starts:
        share = decided[first:last].float().mean().item()
        assert (share < 0.1) if name == "Noise.wav" else (share > 0.5), name
    assert not decided[starts[0][2] + 3:starts[1][1]].any()  # the silence after the first clip


def test_figures_against_itself_and_a_damaged_copy(vad):
    assert silero.evaluate(vad, vad, seconds=3) | {"speech": 0} == {"agreement": 100.0, "speech": 0, "error": 0.0}
    damaged = copy.deepcopy(vad)
    with torch.no_grad():
        damaged.conv1.weight.mul_(0.5)
    assert silero.evaluate(damaged, vad, seconds=3)["error"] > 0.2


def test_missing_clips_are_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(silero, "CLIPS", tmp_path)
    silero.audio.cache_clear()
    try:
        with pytest.raises(VQCError, match="alsa-utils"):
            silero.audio()
    finally:
        silero.audio.cache_clear()


def test_calibration_speech_is_spoken_text_in_model_windows():
    import shutil

    if shutil.which(silero.SPEAKER) is None:
        pytest.skip("espeak-ng is not installed (make setup)")
    batches = silero.calibration_batches(lines=2, batch_size=16)
    assert all(b.shape[1] == silero.CONTEXT + silero.WINDOW for b in batches) and len(batches) > 2
    assert float(batches[1].abs().max()) > 0.05  # spoken, not silence


def test_without_a_speaker_there_is_no_calibration_data(monkeypatch):
    from vqcompress.data import NoData, training_data

    monkeypatch.setattr(silero.shutil, "which", lambda name: None)
    with pytest.raises(NoData, match="apt-get install espeak-ng"):
        training_data({"kind": "bundled", "name": "silero-vad"})
