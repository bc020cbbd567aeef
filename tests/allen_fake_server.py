"""A fake Allen Brain Atlas API on 127.0.0.1 for tests and benchmarks.

Speaks the two services the Allen client uses (queries in `ish_tf.data.allen_query`,
image downloads in `ish_tf.data.allen`), with the real JSON field names (the XML of a real
SectionDataSet, ../shared/data/allen/section_data_set_69289763.xml, with hyphens turned
into underscores):

* ``GET /api/v2/data/query.json?criteria=model::SectionDataSet,rma::criteria,...`` with
  ``[failed$eqfalse]``, ``products[id$eqN]``, ``genes[acronym$in'A','B']``,
  ``plane_of_section[name$eq'...']``, ``rma::include`` (genes, plane_of_section,
  section_images, specimen) and ``rma::options[num_rows$eqN][start_row$eqS][order$eq...]``;
  answers in the RMA envelope (success, id, start_row, num_rows, total_rows, msg).
* ``GET /api/v2/image_download/{id}?downsample=N``: a JPEG whose sides are halved N times.

Faults are scripted per request: `query_faults` (consumed one per query request) and
`image_faults[image_id]` (one per request of that image): "500", "429:SECONDS",
"truncate" (Content-Length promises more than is sent), "corrupt" (a cut JPEG with a
matching Content-Length), "404", "delay:SECONDS", "trickle:SECONDS" (images: the body one
byte every SECONDS, until the server stops), "envelope:MESSAGE" (queries:
success=false), "badjson" (queries). `envelope_error` makes every query fail.

Usage:
    fake = FakeAllen(make_study(...))
    with serve(fake) as base_url:
        ...  # point --api_url at base_url
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from faults import serving, trickle
from PIL import Image

PRODUCTS = {
    1: {"id": 1, "abbreviation": "Mouse", "name": "Mouse Brain", "species": "Mouse",
        "resource": "Allen Mouse Brain Atlas"},
    9: {"id": 9, "abbreviation": "HumanCtx", "name": "Human Cortex Study", "species": "Human",
        "resource": "Allen Human Brain Atlas"},
    11: {"id": 11, "abbreviation": "HumanSZ", "name": "Human Schizophrenia Study",
         "species": "Human", "resource": "Allen Human Brain Atlas"},
}


def human_donor(donor_id: int, name: str, sex: str = "M", age_years: int = 42,
                race: str | None = "White", smoker: object = None, pmi: float | None = 21.5,
                conditions: Sequence[str] = ()) -> dict:
    """A Donor as the API returns it inside specimen(donor(age,conditions))."""
    return {
        "id": donor_id, "name": name, "sex": sex,
        "sex_full_name": {"M": "Male", "F": "Female"}.get(sex, "unknown"),
        "race_only": race, "smoker": smoker, "pmi": pmi, "handedness": "unknown",
        "organism_id": 1, "age_id": 700 + age_years, "tags": f"{name} unknown",
        "age": {"id": 700 + age_years, "name": f"{age_years} yrs",
                "days": int(round(age_years * 365.25)), "embryonic": False,
                "description": f"{age_years} years", "organism_id": 1},
        "conditions": [{"id": 9000 + i, "name": c, "description": c}
                       for i, c in enumerate(conditions)],
    }


def mouse_donor(donor_id: int, name: str = "05-0660", age_days: int = 56) -> dict:
    """A mouse Donor (fields of the real XML response, age P56)."""
    return {
        "id": donor_id, "name": name, "sex": "M", "sex_full_name": "Male", "race_only": None,
        "smoker": None, "pmi": 0.0, "handedness": "unknown", "organism_id": 2,
        "strain": "C57BL/6J", "age_id": 15, "tags": f"{name} unknown",
        "age": {"id": 15, "name": f"P{age_days}", "days": age_days, "embryonic": False},
        "conditions": [],
    }


def section_image(image_id: int, data_set_id: int, section_number: int, width: int = 64,
                  height: int = 48, failed: bool = False) -> dict:
    """A SectionImage (fields of the real XML response)."""
    return {
        "annotated": False, "axes": None, "bits_per_component": 8, "data_set_id": data_set_id,
        "expression": None, "failed": failed, "height": height, "id": image_id,
        "image_height": height, "image_type": "Primary", "image_width": width,
        "isi_experiment_id": None, "lims1_id": image_id, "number_of_components": 3,
        "path": f"/external/aibssan/production3/fake/{image_id}.aff",
        "projection_function": None, "resolution": 1.049, "section_number": section_number,
        "specimen_id": None, "structure_id": None, "tier_count": 7, "width": width,
        "x": 0, "y": 0,
    }


def data_set(data_set_id: int, product_id: int, gene: tuple[str, int] | None, donor: dict,
             specimen_id: int, image_ids: Sequence[int], plane: str = "coronal",
             structure: dict | None = None, tissue_ph: float | None = 6.6,
             failed: bool = False, image_size: tuple[int, int] = (64, 48)) -> dict:
    """A SectionDataSet with genes, plane_of_section, section_images and specimen(donor, structure)."""
    genes = [] if gene is None else [{
        "id": 1000 + data_set_id % 997, "acronym": gene[0], "entrez_id": gene[1],
        "name": f"{gene[0]} gene", "organism_id": 1 if product_id != 1 else 2,
        "chromosome_id": 7, "original_name": gene[0], "original_symbol": gene[0],
        "reference_genome_id": None, "sphinx_id": 1, "version_status": "no change",
        "homologene_id": None, "legacy_ensembl_gene_id": None, "alias_tags": gene[0],
        "genomic_reference_update_id": 1}]
    return {
        "blue_channel": None, "delegate": False, "expression": True, "failed": failed,
        "failed_facet": 734881840, "green_channel": None, "id": data_set_id, "name": None,
        "plane_of_section_id": {"coronal": 1, "sagittal": 2}.get(plane, 3),
        "qc_date": "2009-05-02T22:45:57Z", "red_channel": None, "reference_space_id": 10,
        "rnaseq_design_id": None, "section_thickness": 25.0, "specimen_id": specimen_id,
        "sphinx_id": data_set_id % 100000, "weight": 5470,
        "storage_directory": f"/external/aibssan/production32/image_series_{data_set_id}/",
        "products": [PRODUCTS[product_id]],
        "genes": genes,
        "plane_of_section": {"id": {"coronal": 1, "sagittal": 2}.get(plane, 3), "name": plane},
        "section_images": [section_image(i, data_set_id, 6 + 8 * k, *image_size)
                           for k, i in enumerate(image_ids)],
        "specimen": {
            "id": specimen_id, "name": f"{donor['name']}.{specimen_id % 100:02d}",
            "donor_id": donor["id"], "hemisphere": "left", "is_cell_specimen": False,
            "is_ish": True, "parent_id": None, "tissue_ph": tissue_ph,
            "structure_id": structure["id"] if structure else None,
            "structure": structure, "donor": donor,
        },
    }


CORTEX_GENES = [("PVALB", 5816), ("SST", 6750), ("VIP", 7432), ("GAD1", 2571),
                ("RORB", 6096), ("CUX2", 23316), ("FEZF2", 55079), ("NEFH", 4744)]


def make_study(n_genes: int = 8, donors_per_gene: int = 2, images_per_set: int = 2,
               product_id: int = 9, first_data_set: int = 100000000,
               first_image: int = 200000000, plane: str = "coronal",
               extra: Sequence[dict] = ()) -> list[dict]:
    """A realistic small study: each gene assayed in a few donors, a few sections each.

    Human products get Cortex-Study-like donors (H08-0020 ...) with visual (V1) or temporal
    (MTG) cortex; HumanSZ alternates schizophrenia and control donors; mouse gets P56 males.
    Also adds one failed data set (must be filtered out by `[failed$eqfalse]`).
    """
    genes = (CORTEX_GENES * (n_genes // len(CORTEX_GENES) + 1))[:n_genes]
    genes = [(g if k < len(CORTEX_GENES) else f"{g}{k}", e + k * 100000)
             for k, (g, e) in enumerate(genes)]
    structures = [{"id": 10269, "acronym": "V1", "name": "primary visual cortex"},
                  {"id": 10235, "acronym": "MTG", "name": "middle temporal gyrus"}]
    out, ds_id, im_id = [], first_data_set, first_image
    for gi, (symbol, entrez) in enumerate(genes):
        for d in range(donors_per_gene):
            donor_no = (gi + d) % 6
            if product_id == 1:
                donor = mouse_donor(4965 + donor_no, f"05-06{60 + donor_no}")
                structure, sym = None, symbol.capitalize()
            else:
                cond = ["schizophrenia"] if product_id == 11 and donor_no % 2 else []
                donor = human_donor(12000 + donor_no, f"H08-00{20 + donor_no}",
                                    sex="MF"[donor_no % 2], age_years=30 + 5 * donor_no,
                                    smoker=["No", "Yes", None][donor_no % 3], conditions=cond)
                structure, sym = structures[donor_no % 2], symbol
            out.append(data_set(ds_id, product_id, (sym, entrez), donor, 300000 + donor_no * 10 + d,
                                list(range(im_id, im_id + images_per_set)), plane=plane,
                                structure=structure))
            ds_id += 7
            im_id += images_per_set + 3
    donor = human_donor(12999, "H08-0099") if product_id != 1 else mouse_donor(4999)
    out.append(data_set(ds_id, product_id, genes[0], donor, 399999, [im_id], plane=plane,
                        failed=True))
    out.extend(extra)
    return sorted(out, key=lambda ds: ds["id"])


def jpeg_bytes(image_id: int, width: int, height: int) -> bytes:
    """A small JPEG with a per-image pattern (so files differ)."""
    img = Image.new("RGB", (max(width, 1), max(height, 1)), (235, 232, 240))
    px = img.load()
    for y in range(0, img.height, 3):
        for x in range((image_id + y) % 5, img.width, 5):
            px[x, y] = (90 + image_id % 60, 70, 120)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


class FakeAllen:
    """State of the fake API: data, scripted faults and a request log (thread-safe)."""

    def __init__(self, data_sets: Sequence[dict], image_delay: float = 0.0):
        self.data_sets = sorted(data_sets, key=lambda ds: ds["id"])
        self.image_sizes = {im["id"]: (im["width"], im["height"])
                            for ds in self.data_sets for im in ds.get("section_images") or []}
        self.image_delay = image_delay
        self.query_faults: list[str] = []
        self.image_faults: dict[int, list[str]] = {}
        self.envelope_error: str | None = None
        self.log: list[tuple[float, str, str]] = []  # (time, kind, path+query)
        self.user_agents: set[str] = set()
        self.images_served = 0
        self.on_image_served = None  # callable(count) run after each served image
        self.lock = threading.Lock()
        self.closing = threading.Event()  # set when `serve` ends: trickles stop
        self._cache: dict[tuple[int, int], bytes] = {}

    def image_ids(self, product_id: int | None = None) -> list[int]:
        """Ids of the non-failed images of non-failed data sets, in listing order."""
        return [im["id"] for ds in self.data_sets if not ds["failed"]
                and (product_id is None or any(p["id"] == product_id for p in ds["products"]))
                for im in sorted(ds["section_images"], key=lambda im: im["id"]) if not im["failed"]]

    def requests_of(self, kind: str) -> list[str]:
        with self.lock:
            return [p for _, k, p in self.log if k == kind]

    def next_fault(self, kind: str, image_id: int | None = None) -> str | None:
        with self.lock:
            queue = self.query_faults if kind == "query" else self.image_faults.get(image_id, [])
            return queue.pop(0) if queue else None

    def image(self, image_id: int, downsample: int) -> bytes:
        with self.lock:
            key = (image_id, downsample)
            if key not in self._cache:
                w, h = self.image_sizes[image_id]
                self._cache[key] = jpeg_bytes(image_id, w >> downsample, h >> downsample)
            return self._cache[key]

    # ------------------------------------------------------------------ RMA
    def answer_query(self, criteria: str) -> dict:
        """The envelope for one RMA criteria string (success=false on what it cannot parse)."""
        if self.envelope_error is not None:
            return _envelope_error(self.envelope_error)
        if not criteria.startswith("model::SectionDataSet,"):
            return _envelope_error(f"Data Access error in query: unknown model in {criteria[:60]}")
        m_opts = re.search(r"rma::options((?:\[[^\]]*\])*)", criteria)
        opts = dict(re.findall(r"\[(\w+)\$eq([^\]]*)\]", m_opts.group(1))) if m_opts else {}
        try:
            start = int(opts.get("start_row", 0))
            num = opts.get("num_rows", "50")
            num = None if num.strip("'") == "all" else int(num)
        except ValueError:
            return _envelope_error("Data Access error in query: bad rma::options")
        body = criteria.split("rma::options")[0]
        sets = list(self.data_sets)
        if "[failed$eqfalse]" in body:
            sets = [ds for ds in sets if not ds["failed"]]
        m = re.search(r"products\[id\$eq(\d+)\]", body)
        if m:
            sets = [ds for ds in sets if any(p["id"] == int(m.group(1)) for p in ds["products"])]
        m = re.search(r"genes\[acronym\$in([^\]]*)\]", body)
        if m:
            wanted = {g.strip().strip("'") for g in m.group(1).split(",")}
            sets = [ds for ds in sets if any(g["acronym"] in wanted for g in ds["genes"])]
        m = re.search(r"plane_of_section\[name\$eq'([^']*)'\]", body)
        if m:
            sets = [ds for ds in sets if ds["plane_of_section"]["name"] == m.group(1)]
        m_inc = re.search(r"rma::include,(.*?)(?:,rma::|$)", body + ",rma::")
        include = m_inc.group(1) if m_inc else ""
        top = set(re.findall(r"(?:^|,)(\w+)", re.sub(r"\([^()]*(?:\([^()]*\)[^()]*)*\)", "", include)))
        keep = {"genes", "plane_of_section", "section_images", "specimen", "products"} & top
        dropped = {"genes", "plane_of_section", "section_images", "specimen", "products"} - keep
        rows = [{k: v for k, v in ds.items() if k not in dropped} for ds in sets]
        page = rows[start:] if num is None else rows[start:start + num]
        return {"success": True, "id": 0, "start_row": start, "num_rows": len(page),
                "total_rows": len(rows), "msg": page}


def _envelope_error(msg: str) -> dict:
    return {"success": False, "id": -1, "start_row": 0, "num_rows": 0, "total_rows": 0, "msg": msg}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real host
    # Headers and body go out in separate writes; without this, Nagle's algorithm and the
    # client's delayed ACK add ~40 ms to every response on a kept-alive connection.
    disable_nagle_algorithm = True
    fake: FakeAllen

    def log_message(self, format, *args):  # noqa: A002 - keep test output quiet
        pass

    def _send(self, code: int, body: bytes, ctype: str, headers: dict | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _common_fault(self, fault: str | None) -> bool:
        """Serves a status fault; returns True when the request is answered."""
        if fault is None:
            return False
        if fault == "500":
            self._send(500, b"Internal Server Error", "text/plain")
            return True
        if fault.startswith("429"):
            seconds = fault.partition(":")[2] or "1"
            self._send(429, b"Too Many Requests", "text/plain", {"Retry-After": seconds})
            return True
        if fault == "404":
            self._send(404, b"Not Found", "text/plain")
            return True
        if fault.startswith("delay:"):
            time.sleep(float(fault.partition(":")[2]))
        return False

    def do_GET(self):  # noqa: N802 - http.server's name
        fake = self.fake
        with fake.lock:
            fake.user_agents.add(self.headers.get("User-Agent", ""))
        parsed = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(parsed.query, keep_blank_values=True)
        if parsed.path == "/api/v2/data/query.json":
            with fake.lock:
                fake.log.append((time.monotonic(), "query", self.path))
            fault = fake.next_fault("query")
            if self._common_fault(fault):
                return
            if fault == "badjson":
                self._send(200, b'{"success": true, "msg": [', "application/json")
                return
            criteria = (query.get("criteria") or [""])[0]
            payload = (_envelope_error(fault.partition(":")[2])
                       if fault and fault.startswith("envelope:") else fake.answer_query(criteria))
            self._send(200, json.dumps(payload).encode(), "application/json")
            return
        m = re.fullmatch(r"/api/v2/image_download/(\d+)", parsed.path)
        if m:
            image_id = int(m.group(1))
            with fake.lock:
                fake.log.append((time.monotonic(), "image", self.path))
            fault = fake.next_fault("image", image_id)
            if self._common_fault(fault):
                return
            if image_id not in fake.image_sizes:
                self._send(404, b"Not Found", "text/plain")
                return
            try:
                downsample = int((query.get("downsample") or ["0"])[0])
            except ValueError:
                self._send(400, b"downsample must be an integer", "text/plain")
                return
            if fake.image_delay:
                time.sleep(fake.image_delay)
            body = fake.image(image_id, downsample)
            if fault == "truncate":
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            if fault and fault.startswith("trickle:"):
                interval = float(fault.partition(":")[2])
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.flush()
                trickle(self.wfile, body, interval, fake.closing)
                self.close_connection = True
                return
            if fault == "corrupt":
                body = body[: len(body) // 2]
            self._send(200, body, "image/jpeg")
            with fake.lock:
                fake.images_served += 1
                count = fake.images_served
            if fake.on_image_served is not None:
                fake.on_image_served(count)
            return
        self._send(404, b"Not Found", "text/plain")


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # Clients dropping connections (aborted downloads, Ctrl-C tests) are expected here.
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


@contextlib.contextmanager
def serve(fake: FakeAllen) -> Iterator[str]:
    """Runs `fake` on 127.0.0.1 (a free port) in a thread; yields its base URL."""
    fake.closing.clear()
    handler = type("Handler", (_Handler,), {"fake": fake})
    server = _QuietServer(("127.0.0.1", 0), handler)
    with serving(server, on_stop=fake.closing.set) as url:
        yield url
