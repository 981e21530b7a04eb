"""`instanas-classify IMAGE... --url http://127.0.0.1:8000`: classify files with a running server.

Standard library only (urllib). One `POST /classify` per file, in order; prints a table (file,
label, probability, architecture code (@ the resolution of a cascade's network that answered),
operating point, the architecture's estimated latency
and the server's measured time) or, with `--json`, a JSON list of the server's responses.

Exit status: 0 every file classified; 1 the server refused at least one (its message is
printed, the other files are still sent); 2 bad usage or a file that cannot be read (nothing
is sent); 3 the server cannot be reached (or does not answer in time).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
PROG = "instanas-classify"


class Refused(Exception):
    """The server answered with an error status."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class Unreachable(Exception):
    """No answer from the server."""


def classify(url: str, data: bytes, params: dict, timeout: float) -> dict:
    """One image's response from `POST {url}/classify`; raises Refused or Unreachable."""
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    request = urllib.request.Request(url.rstrip("/") + "/classify" + (f"?{query}" if query else ""), data=data,
                                     method="POST", headers={"Content-Type": "application/octet-stream",
                                                             "Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise _refused(exc) from None
    except (urllib.error.URLError, OSError) as exc:  # refused, unknown host, timed out
        reason = getattr(exc, "reason", exc)
        raise Unreachable(f"cannot reach the server at {url}: {reason}") from None
    except ValueError as exc:  # not JSON: something else answers at that address
        raise Unreachable(f"the server at {url} did not answer with JSON: {exc}") from None


def _refused(exc: urllib.error.HTTPError) -> Refused:
    body = exc.read()
    try:
        error = json.loads(body)["error"]
        if isinstance(error, dict):
            return Refused(exc.code, str(error.get("code", "error")), str(error.get("message", "")))
        return Refused(exc.code, "error", str(error))
    except (ValueError, KeyError, TypeError):
        return Refused(exc.code, "error", body.decode("utf-8", "replace").strip() or exc.reason)


def _point(response: dict) -> str:
    point = response.get("operating_point") or {}
    return f"{point.get('name') or '-'} ({point.get('reason', '?')})"


def table(results: list[tuple[str, dict]]) -> str:
    """The rows of a table: one per file, and one per further class when top-k > 1."""
    header = ("file", "label", "probability", "architecture", "operating point", "est. ms", "total ms")
    rows = []
    for name, response in results:
        arch, latency = response["architecture"], response.get("latency_ms", {})
        first, *rest = response["top_k"]
        # a cascade's network at another resolution: its code @ that resolution
        code = arch["code"] if not arch.get("network") else f"{arch['code']}@{arch['resolution']}"
        rows.append((name, first["label"], f"{first['probability']:.4f}", code, _point(response),
                     f"{arch['estimated_latency_ms']:.3f}", f"{latency.get('total', float('nan')):.1f}"))
        rows.extend(("", s["label"], f"{s['probability']:.4f}", "", "", "", "") for s in rest)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    right = {2, 5, 6}
    lines = ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in [header, *rows]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description="Classify images with a running instanas server "
                                     "(one POST /classify a file).", epilog="Exit status: 0 all classified, 1 the "
                                     "server refused some, 2 usage or unreadable file, 3 server unreachable.")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, WebP, BMP, GIF, TIFF)")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the server's responses as a JSON list")
    parser.add_argument("--top-k", type=int, help="classes listed per image (default: 1 in the table, the server's "
                        "default with --json)")
    parser.add_argument("--operating-point", help="the controller to use (see GET /model)")
    parser.add_argument("--max-latency-ms", type=float, help="the most accurate operating point within this budget")
    parser.add_argument("--architecture", help="auto, mobilenet_v2, all, or an architecture code")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each answer (default 60)")
    args = parser.parse_args(argv)
    if args.top_k is not None and args.top_k < 1:
        parser.error("--top-k must be at least 1")
    if urllib.parse.urlsplit(args.url).scheme not in ("http", "https"):
        parser.error(f"--url must be an http(s) URL, not {args.url!r}")

    files = []
    for name in args.images:
        try:
            files.append((name, Path(name).read_bytes()))
        except OSError as exc:
            print(f"{PROG}: cannot read {name}: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_USAGE
    top_k = args.top_k if args.top_k is not None or args.json else 1
    params = {"top_k": top_k, "operating_point": args.operating_point, "max_latency_ms": args.max_latency_ms,
              "architecture": args.architecture}

    results, records, status = [], [], EXIT_OK
    for name, data in files:
        try:
            response = classify(args.url, data, params, args.timeout)
        except Unreachable as exc:
            print(f"{PROG}: {exc}", file=sys.stderr)
            return EXIT_UNREACHABLE
        except Refused as exc:
            print(f"{PROG}: {name}: the server refused it: {exc}", file=sys.stderr)
            records.append({"file": name, "error": {"status": exc.status, "code": exc.code, "message": exc.message}})
            status = EXIT_REFUSED
            continue
        results.append((name, response))
        records.append({"file": name, **response})
    if args.json:
        print(json.dumps(records, indent=2))
    elif results:
        print(table(results))
    return status


if __name__ == "__main__":
    sys.exit(main())
