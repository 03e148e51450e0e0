"""``python -m orpolab.evaluate.review <sweep> [<evaluation id>] [--reviewer NAME] [--port N] [--host H]``."""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from orpolab.core import console
from orpolab.core.errors import OrpolabError


def default_reviewer() -> str:
    """The login name when it is a plain file name, else ``reviewer``."""
    from orpolab.evaluate.review.ratings import REVIEWER

    try:
        name = getpass.getuser()
    except Exception:  # no login name in a container
        return "reviewer"
    return name if REVIEWER.fullmatch(name) else "reviewer"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orpolab.evaluate.review",
                                     description="Blind side-by-side review of an evaluation's answers in the "
                                                 "browser; each rating is saved as it is given.")
    parser.add_argument("sweep_dir")
    parser.add_argument("evaluation", nargs="?", help="evaluation id (needed when the sweep has several)")
    parser.add_argument("--reviewer", default=None, help="your name: your ratings file (default: the login name)")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    parser.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (default) keeps the page on this machine")
    console.add_debug_flag(parser)
    args = parser.parse_args(argv)

    def serve() -> None:
        from werkzeug.serving import make_server

        from orpolab.evaluate.review import ratings, source
        from orpolab.evaluate.review.server import create_app

        reviewer = ratings.check_reviewer(args.reviewer or default_reviewer())
        if not 0 <= args.port <= 65535:
            raise OrpolabError(f"--port must be between 0 and 65535, got {args.port}")
        folder, review = source.load(Path(args.sweep_dir), args.evaluation)
        path = ratings.ratings_file(folder, reviewer)
        log = ratings.RatingLog(path)
        app = create_app(review, log, reviewer)
        try:
            server = make_server(args.host, args.port, app, threaded=True)
        except OSError as err:
            raise OrpolabError(f"cannot listen on {args.host}:{args.port} ({err.strerror}); try --port 0") from err
        host = f"[{args.host}]" if ":" in args.host else args.host
        done = sum(item in log.given for item in review.items)
        print(f"review of evaluation {review.evaluation} by {reviewer}: {done} of {len(review.items)} rated, "
              f"pairs {', '.join(review.pair_ids)}", flush=True)
        print(f"ratings: {path}", flush=True)
        print(f"open http://{host}:{server.server_port}/   (Ctrl-C stops; every rating is already saved)", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()

    return console.run_cli(serve, args.debug)


if __name__ == "__main__":
    sys.exit(main())
