"""Submit checks of the text-classification settings (tokenizer, TF-IDF), and their input schemas."""

from __future__ import annotations

import io

import pytest

from app import model_registry
from app.jobs.errors import SpecError

TEXT_CSV = b"text,label\n" + b"".join(
    f"some words about topic {i % 3} number {i},{'abc'[i % 3]}\n".encode() for i in range(30))


def upload(client, auth) -> str:
    r = client.post("/api/v1/datasets", headers=auth, content_type="multipart/form-data",
                    data={"file": (io.BytesIO(TEXT_CSV), "texts.csv")})
    assert r.status_code == 201, r.get_json()
    return r.get_json()["id"]


def spec(dataset: dict, model: dict) -> dict:
    return {"kind": "train", "name": "text", "dataset": dataset, "model": model}


def test_bpe_and_tfidf_text_jobs_are_queued(client, auth):
    dataset_id = upload(client, auth)
    text = {"id": dataset_id, "text_column": "text", "target": "label"}
    r = client.post("/api/v1/jobs", headers=auth,
                    json=spec({**text, "tokenizer": {"kind": "bpe", "vocab_size": 300}}, {"arch": "gru"}))
    assert r.status_code == 201, r.get_json()
    r = client.post("/api/v1/jobs", headers=auth, json=spec(text, {"arch": "mlp", "tfidf": {"ngram_max": 1}}))
    assert r.status_code == 201, r.get_json()


@pytest.mark.parametrize("dataset,model,field,words", [
    ({"id": "builtin:iris"}, {"arch": "mlp", "tfidf": {}}, "model.tfidf", "text classification"),
    ({"id": "builtin:iris", "tokenizer": {"kind": "bpe"}}, {"arch": "gru"}, "dataset.tokenizer", "text classification"),
    ({"id": "builtin:iris", "tokenizer": {"kind": "bpe"}}, {"arch": "mlp", "tfidf": {}}, "dataset.tokenizer", "n-grams"),
    ({"id": "builtin:iris", "tokenizer": {"kind": "sentencepiece"}}, {"arch": "gru"}, "dataset.tokenizer.kind", "bpe"),
])
def test_text_settings_where_they_do_not_apply_answer_422_naming_the_field(client, auth, dataset, model, field, words):
    r = client.post("/api/v1/jobs", headers=auth, json=spec(dataset, model))
    assert r.status_code == 422, r.get_json()
    assert r.content_type.startswith("application/problem+json")
    text = r.get_data(as_text=True)
    assert field in text and words in text, text


def test_subword_and_tfidf_models_take_texts_longer_than_max_tokens():
    long_text = " ".join(["word"] * 50)
    words = model_registry.input_schema({"input_kind": "tokens", "max_tokens": 8, "vocab_size": 100})
    with pytest.raises(SpecError, match="at most 8"):
        model_registry.check_inputs(schema=words, inputs=[long_text], ref="m@1")
    bpe = model_registry.input_schema({"input_kind": "tokens", "max_tokens": 8, "vocab_size": 100, "tokenizer": "bpe"})
    tfidf = model_registry.input_schema({"input_kind": "tfidf", "input_shape": [500], "vocab_size": 500})
    assert bpe["tokenizer"] == "bpe" and tfidf == {"kind": "text", "tokenizer": "tfidf", "vocab_size": 500}
    for schema in (bpe, tfidf):
        model_registry.check_inputs(schema=schema, inputs=[long_text], ref="m@1")
        with pytest.raises(SpecError, match="expected a string"):
            model_registry.check_inputs(schema=schema, inputs=[[1, 2]], ref="m@1")
