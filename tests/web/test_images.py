"""Image uploads and image specs at the API: zips of class folders, refused archives, the arch-task rule."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pandas as pd
from PIL import Image


def png(color: tuple[int, int, int], size: int = 6) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), color, dtype=np.uint8), "RGB").save(out, "PNG")
    return out.getvalue()


def zipped(members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return out.getvalue()


def upload(client, auth, data: bytes, name: str):
    return client.post("/api/v1/datasets", headers=auth, content_type="multipart/form-data",
                       data={"file": (io.BytesIO(data), name)})


COLOURS = {f"red/{i}.png": png((200, 20, 20)) for i in range(3)} | {f"blue/{i}.png": png((20, 20, 200)) for i in range(2)}


def train_spec(ds: str, arch: str = "cnn2d", **dataset) -> dict:
    return {"kind": "train", "name": "pics", "model": {"arch": arch}, "dataset": {"id": ds, **dataset}}


def test_a_zip_of_class_folders_is_described_and_accepted_for_cnn2d(client, auth):
    r = upload(client, auth, zipped(COLOURS), "colours.zip")
    assert r.status_code == 201, r.get_json()
    body = r.get_json()
    assert body["rows"] == 5 and body["schema"]["classes"] == {"blue": 2, "red": 3}
    assert body["schema"]["image_sizes"][0] == [6, 6]
    ok = client.post("/api/v1/jobs", json=train_spec(body["id"], image_size=8), headers=auth)
    assert ok.status_code == 201, ok.get_json()
    for spec, field in ((train_spec(body["id"], "lstm"), "model.arch"),
                        (train_spec(body["id"], target="colour"), "dataset.target"),
                        (train_spec(body["id"], features=["x"]), "dataset.features")):
        bad = client.post("/api/v1/jobs", json=spec, headers=auth)
        assert bad.status_code == 422 and bad.get_json()["errors"][0]["field"] == field, bad.get_json()


def test_path_traversal_in_a_zip_is_refused(client, auth):
    for name in ("../evil.png", "/etc/evil.png", "red/../../evil.png"):
        r = upload(client, auth, zipped({**COLOURS, name: png((1, 2, 3))}), "evil.zip")
        assert r.status_code == 422, (name, r.get_json())
        assert r.get_json()["errors"][0]["field"] == "file" and "unsafe path" in r.get_json()["detail"]
    listed = client.get("/api/v1/datasets", headers=auth).get_json()["items"]
    assert [d for d in listed if not d["builtin"]] == []  # nothing was stored


def test_a_zip_bomb_is_refused(client, auth):
    bomb = zipped({**COLOURS, "red/bomb.png": b"\0" * (20 * 2**20)}, zipfile.ZIP_DEFLATED)
    assert len(bomb) < 2**20
    r = upload(client, auth, bomb, "bomb.zip")
    assert r.status_code == 422 and r.get_json()["errors"][0]["field"] == "file"
    assert "zip bomb" in r.get_json()["detail"] or "unpacks to" in r.get_json()["detail"], r.get_json()


def test_zips_without_class_folders_or_images_are_refused(client, auth):
    for members, words in (({"a.png": png((1, 1, 1))}, "class folder"), ({"red/a.txt": b"hi"}, "not a .png"),
                           ({"red/a.png": b"not really"}, "not a PNG")):
        r = upload(client, auth, zipped(members), "x.zip")
        assert r.status_code == 422 and words in r.get_json()["detail"], r.get_json()
    assert upload(client, auth, b"PK not a zip", "x.zip").status_code == 422


def test_architectures_must_serve_the_datasets_task(client, auth):
    r = client.post("/api/v1/jobs", json=train_spec("builtin:digits"), headers=auth)
    assert r.status_code == 422 and r.get_json()["errors"][0]["field"] == "model.arch"
    assert "cnn2d does not serve classification" in r.get_json()["detail"]
    assert client.post("/api/v1/jobs", json=train_spec("builtin:digits_images"), headers=auth).status_code == 201
    assert client.post("/api/v1/jobs", json=train_spec("builtin:digits_images", "mlp"), headers=auth).status_code == 201
    bad = client.post("/api/v1/jobs", json=train_spec("builtin:digits", "mlp", image_size=16), headers=auth)
    assert bad.status_code == 422 and bad.get_json()["errors"][0]["field"] == "dataset.image_size"


def test_a_parquet_image_column_is_recognised(client, auth):
    frame = pd.DataFrame({"picture": [png((200, 0, 0)), png((0, 0, 200))] * 3, "colour": ["red", "blue"] * 3})
    out = io.BytesIO()
    frame.to_parquet(out)
    r = upload(client, auth, out.getvalue(), "pics.parquet")
    assert r.status_code == 201, r.get_json()
    column = {c["name"]: c for c in r.get_json()["schema"]["columns"]}["picture"]
    assert column["image"] is True and column["samples"][0] == "<image 6x6>"
    ds = r.get_json()["id"]
    assert client.post("/api/v1/jobs", json=train_spec(ds, image_column="picture", target="colour"),
                       headers=auth).status_code == 201
    bad = client.post("/api/v1/jobs", json=train_spec(ds, image_column="colour", target="colour"), headers=auth)
    assert bad.status_code == 422 and bad.get_json()["errors"][0]["field"] == "dataset.image_column"
