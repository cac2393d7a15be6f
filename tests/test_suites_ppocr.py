"""The OCR suites: rendered news lines that the fp32 networks read and orient, and figures that
fall when the weights are damaged."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from vqcompress.errors import VQCError
from vqcompress.suites import ppocr

for package in ("onnx", "onnx2torch", "rapidocr_onnxruntime", "gensim"):
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (make setup)", allow_module_level=True)


@pytest.fixture(scope="module")
def rec():
    from vqcompress.models.pretrained import load_pretrained

    return load_pretrained("ppocr-rec")


def test_lines_are_the_news_text_in_order_and_short():
    lines = ppocr.text_lines()
    assert lines[:2] == ("Hundreds of people have been", "forced to vacate their homes")
    assert max(map(len, lines)) <= ppocr.LINE_CHARS and len(lines) > ppocr.LINES


def test_a_line_is_prepared_as_rapidocr_prepares_it():
    image = ppocr.render("Hill Top", ppocr.FONTS[0])
    rec_input, cls_input = ppocr.prepare(image, ppocr.REC_WIDTH, False), ppocr.prepare(image, ppocr.CLS_WIDTH, True)
    assert rec_input.shape == (3, 48, 320) and cls_input.shape == (3, 48, 192)
    assert rec_input.min() == -1 and rec_input.max() <= 1 and (rec_input[:, :, -1] == 0).all()


def test_ctc_greedy_merges_repeats_and_drops_blanks():
    steps = torch.eye(4)[[1, 1, 0, 1, 2, 2, 3, 0]]
    assert ppocr.ctc_greedy(steps, ["", "a", "b", "c"]) == "aabc"


def test_fp32_recognizer_reads_most_lines_exactly(rec):
    figures = ppocr.evaluate_rec(rec, lines=10)
    assert figures["same"] == 100 and figures["exact"] >= 80  # 9 of 10: one line read with a trailing space


def test_damaged_recognizer_reads_less(rec):
    damaged = copy.deepcopy(rec)
    torch.manual_seed(0)
    with torch.no_grad():
        for module in damaged.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.mul_(1 + 0.3 * torch.randn_like(module.weight))
    figures = ppocr.evaluate_rec(damaged, rec, lines=5)
    assert figures["same"] < 100


def test_classifier_tells_upright_from_turned_lines():
    from vqcompress.models.pretrained import load_pretrained

    assert ppocr.evaluate_cls(load_pretrained("ppocr-cls"), lines=20) == {"accuracy": 100.0, "agreement": 100.0}


def test_asking_for_more_lines_than_the_text_has_is_one_line():
    with pytest.raises(VQCError, match="the text has"):
        ppocr.samples(10**6)


def test_calibration_lines_are_none_the_suite_reads():
    batches = ppocr.calibration_batches(10, batch_size=4)
    assert [len(b) for b in batches] == [4, 4, 2] and batches[0].shape[1:] == (3, ppocr.HEIGHT, ppocr.REC_WIDTH)
    assert ppocr.CALIBRATION_FROM >= ppocr.LINES
