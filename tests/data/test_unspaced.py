"""Text written without spaces between words (Chinese here): the unigram tokenizer, the word tokenizer refused, a
subword vocabulary sized for the script, metrics counted per character (as sacreBLEU's zh), and Chinese end to
end — prepare, train, generate, stream, serve, compare."""

from __future__ import annotations

import json
import random
from pathlib import Path

import openai
import pytest

from glmlab.config import resolve_config
from glmlab.data.prepare import prepare
from glmlab.data.scripts import ScriptProfile, profile
from glmlab.data.tokenizer import FIRST_TEXT_ID, SPECIAL_TOKENS, Tokenizer, default_vocab_size, train_tokenizer
from glmlab.errors import GlmlabError
from glmlab.evaluation.compare import compare_runs
from glmlab.evaluation.sample_metrics import sample_report
from glmlab.evaluation.text_units import resolve, units
from glmlab.finetune.metrics import generation_metrics
from glmlab.generation.generate import stream
from glmlab.generation.settings import GenerationSettings
from glmlab.runs import load_run
from glmlab.training.trainer import train
from tests.conftest import TINY_MODEL, TINY_TRAIN

# Tang poems (public domain), one document each
POEMS = [
    "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。", "春眠不觉晓，处处闻啼鸟。\n夜来风雨声，花落知多少。",
    "白日依山尽，黄河入海流。\n欲穷千里目，更上一层楼。", "红豆生南国，春来发几枝。\n愿君多采撷，此物最相思。",
    "千山鸟飞绝，万径人踪灭。\n孤舟蓑笠翁，独钓寒江雪。", "空山不见人，但闻人语响。\n返景入深林，复照青苔上。",
    "锄禾日当午，汗滴禾下土。\n谁知盘中餐，粒粒皆辛苦。", "鹅鹅鹅，曲项向天歌。\n白毛浮绿水，红掌拨清波。",
    "日照香炉生紫烟，遥看瀑布挂前川。\n飞流直下三千尺，疑是银河落九天。",
    "朝辞白帝彩云间，千里江陵一日还。\n两岸猿声啼不住，轻舟已过万重山。",
    "两个黄鹂鸣翠柳，一行白鹭上青天。\n窗含西岭千秋雪，门泊东吴万里船。",
    "月落乌啼霜满天，江枫渔火对愁眠。\n姑苏城外寒山寺，夜半钟声到客船。",
]


@pytest.fixture(scope="module")
def poems(tmp_path_factory) -> Path:
    rng = random.Random(0)
    docs = [rng.choice(POEMS) for _ in range(600)]
    path = tmp_path_factory.mktemp("zh") / "poems.jsonl"
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path


def test_unigram_tokenizer_round_trips_and_keeps_glmlabs_special_ids(shakespeare_excerpt, tmp_path):
    english = shakespeare_excerpt.read_text()
    tok = train_tokenizer("unigram", [english], 1000)
    assert [tok.hf.id_to_token(i) for i in range(FIRST_TEXT_ID)] == list(SPECIAL_TOKENS)
    text = english[3000:3600]
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(text) / len(ids) > 2.0
    tok.save(tmp_path / "tokenizer.json")
    again = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert again.kind == "unigram" and again.encode(text) == ids
    chinese = train_tokenizer("unigram", POEMS * 20, 600)
    poem = POEMS[3]
    assert chinese.decode(chinese.encode(poem)) == poem and chinese.unk_id not in chinese.encode(poem)


def test_the_word_tokenizer_is_refused_on_unspaced_text_and_says_what_to_use():
    with pytest.raises(GlmlabError, match="written without spaces") as refused:
        train_tokenizer("word", POEMS * 5)
    assert "--tokenizer unigram" in str(refused.value) and "jieba" in str(refused.value)
    segmented = ["床前 明月 光 ， 疑是 地上 霜 。", "举头 望 明月 ， 低头 思 故乡 。"] * 20
    assert train_tokenizer("word", segmented).encode("明月")  # words separated by spaces are fine


def test_subword_vocabulary_defaults_follow_the_script():
    chinese = ScriptProfile(share=0.99, mean_run=5.0, distinct=6123)
    english = profile(["the quick brown fox jumps over the lazy dog"])
    assert default_vocab_size("bpe", chinese) == 25000 and default_vocab_size("unigram", chinese) == 25000
    assert default_vocab_size("bpe", ScriptProfile(0.99, 5.0, 100)) == 8000  # at least
    assert default_vocab_size("bpe", ScriptProfile(0.99, 5.0, 50_000)) == 32000  # at most
    assert default_vocab_size("bpe", english) == 4096 and default_vocab_size("unigram", english) == 8000


def test_metrics_count_characters_of_chinese_as_sacrebleus_zh_does():
    assert units("床前明月光，疑是 ok go", "zh") == ["床", "前", "明", "月", "光", "，", "疑", "是", "ok", "go"]
    assert units("a b", "char") == ["a", "b"] and resolve("auto", POEMS) == "zh"
    assert resolve("auto", ["plain english words"]) == "whitespace"
    with pytest.raises(GlmlabError, match="unknown metric tokenizer"):
        resolve("jieba", POEMS)
    generated = ["床前明月光，疑是地上霜。", "春眠不觉晓，处处闻啼鸟。"]
    report = sample_report(generated, POEMS)
    assert report.units == "zh" and report.bleu[2] > 0.3 and 0.3 < report.distinct[1] < 1
    whitespace = sample_report(generated, POEMS, unit="whitespace")  # a clause is one 'word': meaningless
    assert whitespace.bleu[2] < 0.2 and whitespace.mean_length < 2
    figures = generation_metrics(["床前明月光", "春眠不觉"], ["床前明月光", "春眠不觉晓"])
    assert figures["metric_tokenizer"] == "zh" and figures["exact_match"] == 0.5
    assert 0.5 < figures["rouge_l"] < 1.0  # per character, the second is a close miss, not a total one


@pytest.mark.slow
def test_chinese_end_to_end(poems, tmp_path):
    data = tmp_path / "data"
    meta = prepare([poems], data, tokenizer="unigram", vocab_size=400)
    assert meta["splits"]["train"]["unk_tokens"] == 0 and meta["tokenizer"] == "unigram"
    runs = []
    for seed in (1, 2):
        out = tmp_path / f"run{seed}"
        train(resolve_config({}, [*TINY_MODEL, *TINY_TRAIN, "train.max_steps=60", "train.sample_tokens=0",
                                  f"train.seed={seed}"]), data, out, show_progress=False)
        runs.append(out)
    run = load_run(runs[0])
    deltas = list(stream(run.model, run.tokenizer, "床前", GenerationSettings(max_new_tokens=40, seed=3)))
    text = "".join(deltas)
    assert text and all("\ufffd" not in d for d in deltas)  # never half a character
    assert text == run.generate("床前", max_new_tokens=40, seed=3)[0]

    from glmlab.serve.app import create_app
    from tests.serve.conftest import OPTIONS, LiveServer

    with LiveServer(create_app(run, OPTIONS)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        kwargs = dict(model="tiny", prompt="春眠", max_tokens=20, seed=5, temperature=1.0)
        whole = client.completions.create(**kwargs).choices[0].text
        chunks = [c.choices[0].text for c in client.completions.create(stream=True, **kwargs) if c.choices]
    assert "".join(chunks) == whole and all("\ufffd" not in c for c in chunks)
    result = compare_runs(runs, samples=20, max_sentences=50)
    assert result.metric_tokenizer == "zh" and all(r.samples.units == "zh" for r in result.runs)
