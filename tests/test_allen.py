"""Tests of the Allen REST client and `bin/fetch`, against a fake API on 127.0.0.1."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ET

import pandas as pd
import pytest
from PIL import Image

from ish_tf.data import allen, allen_http, allen_query
from ish_tf.data import manifest as manifest_lib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import faults  # noqa: E402
from allen_fake_server import FakeAllen, data_set, human_donor, make_study, serve  # noqa: E402
from conftest import ROOT, shared_data_path  # noqa: E402


def _config(out, url, **kw) -> allen.FetchConfig:
    kw.setdefault("backoff_base", 0.01)
    kw.setdefault("max_backoff", 0.05)
    kw.setdefault("timeout", 10.0)
    kw.setdefault("workers", 2)
    kw.setdefault("progress", False)
    return allen.FetchConfig(out=str(out), api_url=url, **kw)


def _queries(fake: FakeAllen) -> list[str]:
    return [urllib.parse.unquote(q) for q in fake.requests_of("query")]


def _tmp_files(out) -> list[str]:
    return [os.path.join(r, f) for r, _, fs in os.walk(out) for f in fs if f.endswith(".tmp")]


def _assert_consistent(out, fake: FakeAllen | None = None) -> pd.DataFrame:
    """The manifest on disk is valid, every row's file exists and decodes at its stated size."""
    path = os.path.join(out, "manifest.csv")
    df = manifest_lib.read_manifest(path)
    for row in df.itertuples():
        with Image.open(manifest_lib.image_path(path, row.path)) as im:
            im.load()
            assert im.size == (row.width, row.height)
    assert not _tmp_files(out)
    if fake is not None:
        assert set(df["image_id"]) <= set(fake.image_ids())
    return df


# --------------------------------------------------------------------------- pure functions
def test_build_rma_criteria_has_documented_pieces():
    q = allen_query.build_rma_criteria(9, genes=["PVALB", "SST"], plane="coronal", start_row=100,
                                 num_rows=50)
    assert q == ("model::SectionDataSet,rma::criteria,[failed$eqfalse],products[id$eq9],"
                 "genes[acronym$in'PVALB','SST'],plane_of_section[name$eq'coronal'],"
                 "rma::include,genes,plane_of_section,section_images,"
                 "specimen(donor(age,conditions),structure),"
                 "rma::options[num_rows$eq50][start_row$eq100][order$eq'data_sets.id']")
    plain = allen_query.build_rma_criteria(1)
    assert "genes[" not in plain and "plane_of_section[" not in plain
    assert "[start_row$eq0]" in plain and "products[id$eq1]" in plain
    with pytest.raises(ValueError, match="PV'ALB"):
        allen_query.build_rma_criteria(9, genes=["PV'ALB"])
    with pytest.raises(ValueError, match="plane"):
        allen_query.build_rma_criteria(9, plane="coronal]")


def test_urls():
    assert allen.image_url("http://h:1/", 42, 3) == "http://h:1/api/v2/image_download/42?downsample=3"
    assert allen_query.query_url("http://h", "model::X").startswith(
        "http://h/api/v2/data/query.json?criteria=model::X")


def test_parse_retry_after_and_policy():
    assert allen_http.parse_retry_after("7") == 7.0
    assert allen_http.parse_retry_after(None) is None
    assert allen_http.parse_retry_after("soon") is None
    now = 1_700_000_000.0
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now + 30))
    assert allen_http.parse_retry_after(date, now=now) == pytest.approx(30.0, abs=1.0)
    policy = allen_http.RetryPolicy(retries=5, backoff_base=0.5, max_backoff=3.0, max_retry_after=10.0)
    assert [policy.delay(a) for a in range(4)] == [0.5, 1.0, 2.0, 3.0]
    assert policy.delay(0, retry_after=4.0) == 4.0
    assert policy.delay(0, retry_after=3600.0) == 10.0


def test_age_sex_smoker_diagnosis():
    assert allen_query.parse_age_years({"name": "42 yrs", "days": 15341}) == pytest.approx(42.0, abs=0.01)
    assert allen_query.parse_age_years({"name": "42 yrs", "days": None}) == 42.0
    assert allen_query.parse_age_years("P56") == pytest.approx(56 / 365.25)
    assert allen_query.parse_age_years("E15.5") == pytest.approx(-15.5 / 365.25)
    assert allen_query.parse_age_years("6 mos") == pytest.approx(0.5)
    assert allen_query.parse_age_years("unknown") is None and allen_query.parse_age_years(None) is None
    assert [allen_query.normalize_sex(s) for s in ("M", "Female", None)] == ["M", "F", "unknown"]
    assert [allen_query.normalize_smoker(s) for s in ("Yes", False, None)] == ["yes", "no", "unknown"]
    assert allen_query.diagnosis_from_conditions([{"name": "Schizophrenia"}], True) == "schizophrenia"
    assert allen_query.diagnosis_from_conditions([], True) == "control"
    assert allen_query.diagnosis_from_conditions([{"name": "control"}], True) == "control"
    assert allen_query.diagnosis_from_conditions([], False) is None


def test_image_rows_and_unusable_data_sets():
    donor = human_donor(1, "H08-0020", sex="F", age_years=50, conditions=["schizophrenia"])
    ds = data_set(5, 11, ("SST", 6750), donor, 77, [12, 11], plane="coronal",
                  structure={"id": 3, "acronym": "DLPFC", "name": "dorsolateral prefrontal cortex"})
    rows, problem = allen_query.image_rows(ds, allen_query.STUDIES["schizophrenia"])
    assert problem is None
    assert [r["image_id"] for r in rows] == [11, 12]
    r = rows[0]
    assert (r["gene_symbol"], r["entrez_id"], r["donor_id"], r["donor_sex"]) == ("SST", 6750, "H08-0020", "F")
    assert r["donor_age"] == pytest.approx(50.0, abs=0.01)
    assert (r["diagnosis"], r["region"], r["plane_of_section"], r["tissue_ph"]) == (
        "schizophrenia", "DLPFC", "coronal", 6.6)
    assert (r["specimen_id"], r["experiment_id"], r["study"]) == (77, 5, "schizophrenia")
    no_gene = data_set(6, 11, None, donor, 77, [13])
    assert allen_query.image_rows(no_gene, allen_query.STUDIES["schizophrenia"]) == ([], "data set has no gene acronym")


def _xml_to_obj(el: ET.Element):
    """The JSON shape of an Allen XML element (hyphens -> underscores, typed leaves)."""
    children = list(el)
    if not children:
        if el.get("nil") == "true":
            return None
        text, kind = el.text, el.get("type")
        if kind == "integer":
            return int(text)
        if kind == "float":
            return float(text)
        if kind == "boolean" or text in ("true", "false"):
            return text == "true"
        return text
    tags = [c.tag for c in children]
    if len(set(tags)) == 1 and el.tag.endswith("s") and el.tag.rstrip("s") == tags[0].replace("-", "_").rstrip("s"):
        return [_xml_to_obj(c) for c in children]
    if len(set(tags)) == 1 and len(tags) > 1:
        return [_xml_to_obj(c) for c in children]
    return {c.tag.replace("-", "_"): _xml_to_obj(c) for c in children}


def test_real_section_data_set_fields():
    """The real response's fields are the ones the client reads and the fake server serves."""
    path = shared_data_path("allen", "section_data_set_69289763.xml")
    real = _xml_to_obj(ET.parse(path).getroot())
    assert isinstance(real["section_images"], list) and len(real["section_images"]) == 18
    fake = make_study(n_genes=1, donors_per_gene=1, product_id=1)[0]
    # The fake server's objects carry every field the client reads, under the real names.
    for key in ("id", "failed", "specimen_id", "specimen", "section_images"):
        assert key in real and key in fake
    for key in ("id", "donor_id", "tissue_ph", "donor"):
        assert key in real["specimen"] and key in fake["specimen"]
    for key in ("name", "sex", "pmi", "smoker", "race_only", "id"):
        assert key in real["specimen"]["donor"] and key in fake["specimen"]["donor"]
    for key in ("id", "failed", "width", "height", "data_set_id", "section_number"):
        assert key in real["section_images"][0] and key in fake["section_images"][0]
    # The real record has no genes included: the client must say so, not invent a row.
    assert allen_query.image_rows(real, allen_query.STUDIES["mouse"]) == ([], "data set has no gene acronym")
    real["genes"] = [{"acronym": "Prox1", "entrez_id": 19130}]
    rows, problem = allen_query.image_rows(real, allen_query.STUDIES["mouse"])
    assert problem is None and len(rows) == 18
    assert rows[0]["image_id"] == min(im["id"] for im in real["section_images"])
    assert {r["donor_id"] for r in rows} == {"05-0660"}
    assert (rows[0]["donor_sex"], rows[0]["specimen_id"], rows[0]["pmi"]) == ("M", 68870790, 0.0)
    assert rows[0]["experiment_id"] == 69289763 and rows[0]["diagnosis"] is None
    assert [r["section_number"] for r in rows][:3] == [6, 14, 22]
    # The series: 6, 14, ..., 86, then 102, 118, ..., 158 (18 sections): its median is 74,
    # between 70 and 78; ties go to the lower section (62 before 86).
    central = allen_query.image_rows(real, allen_query.STUDIES["mouse"], sections_per_experiment=3)[0]
    assert sorted(r["section_number"] for r in central) == [62, 70, 78]
    one = allen_query.image_rows(real, allen_query.STUDIES["mouse"], sections_per_experiment=1)[0]
    assert [r["section_number"] for r in one] == [70]


def test_config_validation_names_the_flag(tmp_path):
    good = _config(tmp_path / "o", "http://127.0.0.1:1")
    good.validate()
    (tmp_path / "file").write_text("x")
    bad = [
        (dict(study="rat"), "--study"), (dict(downsample=-1), "--downsample"),
        (dict(workers=0), "--workers"), (dict(genes=("PVALB", "bad gene")), "--genes"),
        (dict(api_url="api.brain-map.org"), "--api_url"), (dict(out=str(tmp_path / "file")), "--out"),
        (dict(out=""), "--out"), (dict(page_size=5000), "--page_size"),
    ]
    for change, flag in bad:
        cfg = _config(tmp_path / "o", "http://127.0.0.1:1")
        for k, v in change.items():
            setattr(cfg, k, v)
        with pytest.raises(ValueError, match=flag):
            cfg.validate()


def test_read_gene_list(tmp_path):
    assert allen.read_gene_list("PVALB, SST,,PVALB") == ("PVALB", "SST")
    f = tmp_path / "genes.txt"
    f.write_text("# cortex markers\nPVALB\nSST  # interneurons\n\nVIP\n")
    assert allen.read_gene_list(f"@{f}") == ("PVALB", "SST", "VIP")
    with pytest.raises(ValueError, match="missing.txt"):
        allen.read_gene_list(f"@{tmp_path / 'missing.txt'}")


# --------------------------------------------------------------------------- fetch
def test_fetch_pages_and_writes_manifest(tmp_path):
    fake = FakeAllen(make_study(n_genes=8, donors_per_gene=2, images_per_set=2))
    with serve(fake) as url:
        result = allen.fetch(_config(tmp_path, url, page_size=5, downsample=2))
    queries = fake.requests_of("query")
    # 16 usable data sets at 5 per page: 4 pages, each asking for the next start_row.
    assert len(queries) == 4
    for k, q in enumerate(_queries(fake)):
        assert f"[start_row$eq{5 * k}]" in q and "products[id$eq9]" in q
    assert all(ua.startswith("ish_tf/") for ua in fake.user_agents)
    df = _assert_consistent(tmp_path, fake)
    assert list(df["image_id"]) == fake.image_ids(9)  # the failed data set is left out
    assert result.listed == result.downloaded == len(df) == 32
    assert set(df["width"]) == {64 >> 2} and set(df["height"]) == {48 >> 2}
    assert (df["path"] == [f"images/{i}.jpg" for i in df["image_id"]]).all()
    assert set(df["study"]) == {"cortex"} and set(df["diagnosis"]) == {"control"}
    assert set(df["region"]) == {"V1", "MTG"} and df["donor_id"].str.match(r"H08-00\d\d").all()
    assert df["entrez_id"].notna().all() and df["donor_age"].between(29, 60).all()
    fails = pd.read_csv(tmp_path / "failures.csv")
    assert list(fails.columns) == list(allen.FAILURE_COLUMNS) and len(fails) == 0


def test_query_retries_500_and_429_with_retry_after(tmp_path):
    fake = FakeAllen(make_study(n_genes=2, donors_per_gene=1, images_per_set=1))
    fake.query_faults = ["500", "429:1"]
    with serve(fake) as url:
        allen.fetch(_config(tmp_path, url))
    times = [t for t, kind, _ in fake.log if kind == "query"]
    assert len(times) == 3
    assert times[2] - times[1] >= 0.9  # Retry-After: 1 was honoured
    assert times[1] - times[0] < 0.9  # the 500 only waited backoff_base
    assert len(_assert_consistent(tmp_path, fake)) == 2


def test_non_success_envelope_quotes_msg_and_loses_nothing(tmp_path):
    fake = FakeAllen(make_study(n_genes=2, donors_per_gene=1, images_per_set=1))
    with serve(fake) as url:
        allen.fetch(_config(tmp_path, url))
        before = (tmp_path / "manifest.csv").read_bytes()
        fake.envelope_error = "Data Access error in query: unknown association 'gens'"
        with pytest.raises(allen_query.AllenApiError, match="unknown association 'gens'"):
            allen.fetch(_config(tmp_path, url))
    assert (tmp_path / "manifest.csv").read_bytes() == before


def test_listing_gives_up_after_retries(tmp_path):
    fake = FakeAllen(make_study(n_genes=1))
    fake.query_faults = ["500"] * 3
    with serve(fake) as url, pytest.raises(allen_query.AllenApiError, match="HTTP 500.*3 attempts"):
        allen.fetch(_config(tmp_path, url, retries=2))
    assert not (tmp_path / "manifest.csv").exists()


def test_image_faults_retry_or_fail_cleanly(tmp_path):
    fake = FakeAllen(make_study(n_genes=3, donors_per_gene=1, images_per_set=2))
    ids = fake.image_ids()
    fake.image_faults = {ids[0]: ["truncate"], ids[1]: ["500", "429:0"], ids[2]: ["404"],
                         ids[3]: ["corrupt"] * 4, ids[4]: ["truncate", "corrupt"]}
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / f".{ids[5]}.jpg.abc.tmp").write_bytes(b"half")  # a killed run's leftover
    with serve(fake) as url:
        result = allen.fetch(_config(tmp_path, url, retries=3))
    df = _assert_consistent(tmp_path, fake)
    assert set(df["image_id"]) == set(ids) - {ids[2], ids[3]}
    fails = pd.read_csv(tmp_path / "failures.csv").set_index("image_id")
    assert set(fails.index) == {ids[2], ids[3]}
    assert fails.loc[ids[2], "reason"] == "HTTP 404 Not Found" and fails.loc[ids[2], "stage"] == "download"
    assert "not a decodable image" in fails.loc[ids[3], "reason"] and "4 attempts" in fails.loc[ids[3], "reason"]
    assert not (tmp_path / "images" / f"{ids[2]}.jpg").exists()
    assert not (tmp_path / "images" / f"{ids[3]}.jpg").exists()
    assert len(fake.requests_of("image")) == len(ids) + 1 + 2 + 3 + 2  # 1 + retries of each fault
    assert result.downloaded == len(ids) - 2
    # A rerun retries only what failed; success removes it from failures.csv.
    with serve(fake) as url:
        rerun = allen.fetch(_config(tmp_path, url))
    assert rerun.downloaded == 2 and rerun.already_present == len(ids) - 2
    assert len(pd.read_csv(tmp_path / "failures.csv")) == 0
    assert list(_assert_consistent(tmp_path, fake)["image_id"]) == ids


def test_interrupted_run_resumes_without_duplicates_or_losses(tmp_path):
    fake = FakeAllen(make_study(n_genes=4, donors_per_gene=2, images_per_set=3), image_delay=0.01)
    ids = fake.image_ids()
    stop = threading.Event()
    fake.on_image_served = lambda n: stop.set() if n >= 5 else None
    with serve(fake) as url:
        with pytest.raises(allen_http.FetchInterrupted, match="rerun"):
            allen.fetch(_config(tmp_path, url, workers=2, flush_every=2), stop=stop)
        first = _assert_consistent(tmp_path, fake)
        on_disk = sorted(int(f[:-4]) for f in os.listdir(tmp_path / "images") if f.endswith(".jpg"))
        assert 3 <= len(first) < len(ids)
        assert on_disk == sorted(first["image_id"])  # nothing on disk is missing from the manifest
        served_before = len(fake.requests_of("image"))
        fake.on_image_served = None
        result = allen.fetch(_config(tmp_path, url))
    final = _assert_consistent(tmp_path, fake)
    assert list(final["image_id"]) == ids and not final["image_id"].duplicated().any()
    assert result.already_present == len(first) and result.downloaded == len(ids) - len(first)
    assert len(fake.requests_of("image")) - served_before == len(ids) - len(first)


def test_rerun_rebuilds_manifest_from_files_and_replaces_bad_ones(tmp_path):
    """A run killed before its manifest flush: complete files are adopted, broken ones refetched."""
    fake = FakeAllen(make_study(n_genes=2, donors_per_gene=1, images_per_set=3))
    ids = fake.image_ids()
    with serve(fake) as url:
        allen.fetch(_config(tmp_path, url))
        os.remove(tmp_path / "manifest.csv")
        good = (tmp_path / "images" / f"{ids[0]}.jpg").read_bytes()
        (tmp_path / "images" / f"{ids[1]}.jpg").write_bytes(good[: len(good) // 2])
        n_before = len(fake.requests_of("image"))
        result = allen.fetch(_config(tmp_path, url))
    assert fake.requests_of("image")[n_before:] == [f"/api/v2/image_download/{ids[1]}?downsample=2"]
    assert result.downloaded == 1 and result.already_present == len(ids) - 1
    assert list(_assert_consistent(tmp_path, fake)["image_id"]) == ids


def test_rows_of_other_runs_are_kept(tmp_path):
    fake = FakeAllen(make_study(n_genes=3, donors_per_gene=1, images_per_set=1))
    with serve(fake) as url:
        allen.fetch(_config(tmp_path, url, genes=("PVALB",)))
        allen.fetch(_config(tmp_path, url, genes=("SST", "VIP")))
    df = _assert_consistent(tmp_path, fake)
    assert sorted(df["gene_symbol"]) == ["PVALB", "SST", "VIP"]


def test_corrupt_existing_manifest_is_reported_and_left_alone(tmp_path):
    (tmp_path / "manifest.csv").write_text("image_id,experiment_id\n1,2\n")
    with pytest.raises(manifest_lib.ManifestError, match="manifest.csv.*missing required"):
        allen.fetch(_config(tmp_path, "http://127.0.0.1:9"))
    assert (tmp_path / "manifest.csv").read_text() == "image_id,experiment_id\n1,2\n"


def test_genes_max_images_and_gene_chunks(tmp_path, monkeypatch):
    fake = FakeAllen(make_study(n_genes=8, donors_per_gene=2, images_per_set=2))
    with serve(fake) as url:
        r = allen.fetch(_config(tmp_path / "a", url, max_images=3, page_size=1))
        assert list(r.manifest["image_id"]) == fake.image_ids()[:3]
        assert len(fake.requests_of("query")) == 2  # stopped paging once 3 images were listed
        monkeypatch.setattr(allen_query, "GENES_PER_QUERY", 2)
        r = allen.fetch(_config(tmp_path / "b", url, genes=("VIP", "PVALB", "NEFH", "NOPE")))
    assert sorted(set(r.manifest["gene_symbol"])) == ["NEFH", "PVALB", "VIP"]
    assert list(r.manifest["experiment_id"]) == sorted(r.manifest["experiment_id"])
    gene_queries = _queries(fake)[2:]
    assert len(gene_queries) == 2 and "genes[acronym$in'VIP','PVALB']" in gene_queries[0]


def test_mouse_defaults_to_sagittal(tmp_path):
    sets = (make_study(n_genes=2, donors_per_gene=1, product_id=1, plane="sagittal")
            + make_study(n_genes=2, donors_per_gene=1, product_id=1, plane="coronal",
                         first_data_set=500, first_image=900))
    fake = FakeAllen(sets)
    with serve(fake) as url:
        r = allen.fetch(_config(tmp_path, url, study="mouse"))
    assert "plane_of_section[name$eq'sagittal']" in _queries(fake)[0]
    assert set(r.manifest["plane_of_section"]) == {"sagittal"} and len(r.manifest) == 4
    assert r.manifest["diagnosis"].isna().all() and set(r.manifest["study"]) == {"mouse"}
    assert r.manifest["donor_age"].iloc[0] == pytest.approx(56 / 365.25)


def test_sections_per_experiment_keeps_the_middle_of_each_series(tmp_path):
    fake = FakeAllen(make_study(n_genes=3, donors_per_gene=2, images_per_set=5, product_id=1,
                                plane="sagittal"))
    with serve(fake) as url:
        r = allen.fetch(_config(tmp_path, url, study="mouse", sections_per_experiment=1))
    m = manifest_lib.read_manifest(os.path.join(tmp_path, "manifest.csv"))
    assert len(r.manifest) == len(m) == 6 and m["experiment_id"].is_unique
    # Five sections numbered 6, 14, 22, 30, 38: the third is the middle one.
    assert set(m["section_number"]) == {22}
    assert sorted(os.listdir(tmp_path / "images")) == sorted(f"{i}.jpg" for i in m["image_id"])
    assert len(fake.requests_of("image")) == 6  # the others were never downloaded
    assert allen_query.central_sections([{"id": 1}, {"id": 2}], 0) == [{"id": 1}, {"id": 2}]
    no_numbers = [{"id": i} for i in range(5)]
    assert allen_query.central_sections(no_numbers, 2) == [{"id": 1}, {"id": 2}]
    with pytest.raises(ValueError, match="--sections_per_experiment"):
        _config(tmp_path, url, sections_per_experiment=-1).validate()


def test_unusable_data_set_is_recorded(tmp_path):
    extra = [data_set(42, 9, None, human_donor(1, "H08-0020"), 5, [7])]
    fake = FakeAllen(make_study(n_genes=1, donors_per_gene=1, images_per_set=1, extra=extra))
    with serve(fake) as url:
        r = allen.fetch(_config(tmp_path, url))
    fails = pd.read_csv(tmp_path / "failures.csv")
    assert fails["experiment_id"].tolist() == [42] and fails["image_id"].isna().all()
    assert fails[["stage", "reason"]].values.tolist() == [["list", "data set has no gene acronym"]]
    assert r.skipped_data_sets == 1 and len(r.manifest) == 1


# --------------------------------------------------------------------------- CLI
# `python -m ish_tf.cli.fetch` with Python's own Ctrl-C handling (KeyboardInterrupt) even
# where the tests run with SIGINT ignored, as a background job's children do (inherited).
_FETCH = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
          "runpy.run_module('ish_tf.cli.fetch', run_name='__main__', alter_sys=True)")


def _cli(args, **kw) -> subprocess.Popen:
    env = dict(os.environ, ISH_TF_PROGRESS="0")
    return subprocess.Popen([sys.executable, "-c", _FETCH, *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_cli_subprocess_against_fake_server(tmp_path):
    fake = FakeAllen(make_study(n_genes=4, donors_per_gene=2, images_per_set=2))
    with serve(fake) as url:
        proc = _cli(["--study=cortex", f"--api_url={url}", f"--out={tmp_path}", "--max_images=5",
                     "--backoff_base=0.01"])
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        bad = _cli(["--study=cortex", f"--api_url={url}", f"--out={tmp_path}", "--genes=PV ALB,S'T"])
        _, bad_err = bad.communicate(timeout=120)
    assert "manifest:" in out and "5 rows" in out
    assert len(_assert_consistent(tmp_path, fake)) == 5
    assert "--study=cortex" in (tmp_path / "fetch_flags.cfg").read_text()
    assert bad.returncode != 0 and "S'T" in bad_err and "--genes" in bad_err


def test_cli_ctrl_c_then_resume(tmp_path):
    fake = FakeAllen(make_study(n_genes=4, donors_per_gene=1, images_per_set=3), image_delay=0.15)
    ids = fake.image_ids()
    running: dict = {}
    # Ctrl-C from the server's thread right after the third image is sent: polling from
    # here could be starved on a loaded machine until the fetch had finished (exit 0).
    fake.on_image_served = lambda n: running["proc"].send_signal(signal.SIGINT) if n == 3 else None
    with serve(fake) as url:
        args = ["--study=cortex", f"--api_url={url}", f"--out={tmp_path}", "--workers=1"]
        running["proc"] = proc = _cli(args)
        _, err = proc.communicate(timeout=60)
        fake.on_image_served = None
        assert proc.returncode == 130, err
        assert "rerun" in err
        first = _assert_consistent(tmp_path, fake)
        assert 2 <= len(first) < len(ids)
        proc = _cli(args)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    final = _assert_consistent(tmp_path, fake)
    assert list(final["image_id"]) == ids
    assert f"already present {len(first)}" in out


# --------------------------------------------------------------------------- reliability
def _fetch_in_thread(config, limit: float):
    """Runs `allen.fetch` in a thread; returns (result or exception, seconds), or fails at `limit`."""
    box: dict = {}

    def run():
        try:
            box["value"] = allen.fetch(config)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["value"] = e

    start = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit)
    assert not thread.is_alive(), f"fetch still running after {limit}s (hangs)"
    return box["value"], time.monotonic() - start


def test_download_deadline_on_trickling_server(tmp_path):
    """One byte every 0.3 s never trips a 2 s read timeout; the 1 s deadline does."""
    policy = allen_http.RetryPolicy(retries=1, backoff_base=0.01)
    with faults.trickling_server(interval=0.3) as url:
        start = time.monotonic()
        with pytest.raises(allen_http.FetchError, match=r"deadline of 1s passed.*2 attempts"):
            allen.download_image(allen_http.make_session(1), f"{url}/x.jpg",
                                 str(tmp_path / "x.jpg"), policy, timeout=2.0, deadline=1.0)
    assert time.monotonic() - start < 8
    assert os.listdir(tmp_path) == []  # no partial file is left


def test_fetch_deadline_on_trickling_server(tmp_path):
    fake = FakeAllen(make_study(n_genes=2, donors_per_gene=1, images_per_set=2))
    ids = fake.image_ids()
    fake.image_faults = {ids[1]: ["trickle:0.3"] * 2}
    with serve(fake) as url:
        config = _config(tmp_path, url, timeout=2.0, download_deadline=1.0, retries=1)
        result, seconds = _fetch_in_thread(config, limit=60)
    assert not isinstance(result, BaseException), result
    assert seconds < 30
    fails = pd.read_csv(tmp_path / "failures.csv")
    assert fails["image_id"].tolist() == [ids[1]]
    assert "deadline of 1s passed" in fails["reason"].iloc[0]
    assert sorted(result.manifest["image_id"]) == sorted(set(ids) - {ids[1]})
    # The default deadline follows the read timeout; 0 turns it off.
    assert allen.FetchConfig(timeout=3.0).resolved_download_deadline() == 30.0
    assert allen.FetchConfig(download_deadline=0).resolved_download_deadline() == 0.0
    with pytest.raises(ValueError, match="--download_deadline"):
        _config(tmp_path, url, download_deadline=-1).validate()


def test_fetch_fails_when_every_download_failed(tmp_path):
    fake = FakeAllen(make_study(n_genes=2, donors_per_gene=1, images_per_set=2))
    ids = fake.image_ids()
    fake.image_faults = {i: ["404"] for i in ids}
    with serve(fake) as url:
        with pytest.raises(allen.FetchRunError, match=r"every download failed \(4 of 4 .*failures.csv"):
            allen.fetch(_config(tmp_path, url))
        fails = pd.read_csv(tmp_path / "failures.csv")  # written before the error
        assert sorted(fails["image_id"]) == ids and set(fails["reason"]) == {"HTTP 404 Not Found"}
        # bin/fetch says so in one line and exits 1 (it catches AllenApiError).
        fake.image_faults = {i: ["404"] for i in ids}
        proc = _cli(["--study=cortex", f"--api_url={url}", f"--out={tmp_path / 'cli'}"])
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert "fetch: error: every download failed (4 of 4" in err and "Traceback" not in err


def test_fetch_read_only_out_is_one_clear_error(tmp_path, monkeypatch):
    fake = FakeAllen(make_study(n_genes=1, donors_per_gene=1, images_per_set=2))
    out = tmp_path / "out"
    with serve(fake) as url, faults.read_only_dir(str(out), monkeypatch):
        with pytest.raises(allen.FetchRunError, match=r"/out/images: cannot write \(") as info:
            allen.fetch(_config(out, url))
    assert "\n" not in str(info.value)


def test_fetch_full_disk_is_one_clear_error(tmp_path, monkeypatch):
    fake = FakeAllen(make_study(n_genes=2, donors_per_gene=1, images_per_set=2))
    with serve(fake) as url:
        (tmp_path / "images").mkdir()
        faults.failing_writes(monkeypatch, str(tmp_path / "images"), errno.ENOSPC)
        with pytest.raises(allen.FetchRunError, match=r"/images/.*cannot write \(No space left on device\)"):
            allen.fetch(_config(tmp_path, url))
        monkeypatch.undo()
        assert not (tmp_path / "failures.csv").exists() or len(pd.read_csv(tmp_path / "failures.csv")) == 0
        result = allen.fetch(_config(tmp_path, url))  # space again: the rerun completes
    assert result.downloaded == len(fake.image_ids())


def test_fetch_non_integer_image_ids_are_skipped_and_named(tmp_path):
    """Ids like "7777777.9", 7777777.9 or "abc" are failures naming the value, never truncated."""
    assert [allen_query.parse_int(v) for v in (12, 12.0, "12", " 12.0 ", "-3")] == [12, 12, 12, 12, -3]
    for bad in (12.5, "7777777.9", 7777777.9, "abc", "", None, True, "1e3"):
        with pytest.raises(ValueError, match="is not an integer"):
            allen_query.parse_int(bad)
    assert allen_query._int_or_none(7777777.9) is None and allen_query._int_or_none("15.0") == 15

    fake = FakeAllen(make_study(n_genes=3, donors_per_gene=1, images_per_set=2))
    ids = fake.image_ids()
    first, second, third = fake.data_sets[0], fake.data_sets[1], fake.data_sets[2]
    first["section_images"][1]["id"] = "7777777.9"
    second["section_images"][0]["id"] = 7777777.9  # a JSON number: int() would give 7777777
    third["section_images"][0]["id"] = "abc"
    third["section_images"][1]["id"] = "12.5"
    with serve(fake) as url:
        result = allen.fetch(_config(tmp_path, url))
    kept = [ids[0], ids[3]]
    assert list(result.manifest["image_id"]) == kept
    assert all("7777777" not in q for q in fake.requests_of("image"))
    fails = pd.read_csv(tmp_path / "failures.csv").set_index("experiment_id")
    assert fails.loc[first["id"], "stage"] == "image"
    assert "section image id '7777777.9' (section_number" in fails.loc[first["id"], "reason"]
    assert "section image id 7777777.9 (section_number" in fails.loc[second["id"], "reason"]
    assert fails.loc[third["id"], "stage"] == "list"  # no usable image left: the data set is out
    assert "'abc'" in fails.loc[third["id"], "reason"] and "'12.5'" in fails.loc[third["id"], "reason"]
    assert fails["image_id"].isna().all() and result.skipped_data_sets == 1


def test_fetch_non_integer_data_set_id_is_named(tmp_path):
    fake = FakeAllen(make_study(n_genes=2, donors_per_gene=1, images_per_set=1))
    bad = fake.data_sets[0]
    bad["id"] = "5.5"
    with serve(fake) as url:
        result = allen.fetch(_config(tmp_path, url))
    fails = pd.read_csv(tmp_path / "failures.csv")
    assert fails["reason"].str.contains("data set id '5.5' is not an integer").tolist() == [True]
    assert len(result.manifest) == 1
