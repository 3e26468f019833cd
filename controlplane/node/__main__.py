"""``python -m controlplane.node``: run a node daemon (started by ``sdk.init`` or
``cairn start``)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import sys
from pathlib import Path

from controlplane import auth
from controlplane.errors import GcsIdentityError
from controlplane.eventlog import fencing
from controlplane.gcs_url import ENV_VAR as GCS_URL_ENV
from controlplane.gcs_url import JOIN_ENV_VAR, JOIN_REPLICA_ENV_VAR
from controlplane.node.daemon import NodeDaemon
from controlplane.parent_death import die_with_parent


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m controlplane.node")
    parser.add_argument("--session-dir", required=True, type=Path)
    # the URL holds the runtime's password: given in $CAIRN_GCS_URL, not argv
    parser.add_argument("--gcs-url", default=os.environ.pop(GCS_URL_ENV, None))
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--resources", required=True, help="JSON object of resource amounts")
    parser.add_argument("--object-store-memory", required=True, type=int)
    parser.add_argument("--labels", default="{}", help="JSON object of the node's labels")
    parser.add_argument("--die-with-parent", action="store_true")
    parser.add_argument(
        "--rpc-port", type=int, default=None, help="serve cairn.Node here (0: any free port)"
    )
    parser.add_argument("--rpc-host", default="127.0.0.1")
    parser.add_argument("--head", action="store_true", help="let nodes join; watch liveness")
    parser.add_argument(
        "--disable-auth", action="store_true", help="serve cairn.Node without a token"
    )
    parser.add_argument(
        "--join-gcs-tls", action="store_true", help="joining nodes reach the GCS over TLS"
    )
    parser.add_argument(
        "--membership-monitor",
        action="store_true",
        help="declare silent nodes dead, as the head does (the GCS replica's node)",
    )
    parser.add_argument(
        "--adopt-store-of",
        default=None,
        help="the id of this node's previous daemon, whose store this one adopts",
    )
    args = parser.parse_args()
    join_gcs_url = os.environ.pop(JOIN_ENV_VAR, None)
    # the GCS replica's plan, secrets included: for the node that joins to run it
    replica_plans = os.environ.pop(JOIN_REPLICA_ENV_VAR, None)
    if not args.gcs_url:
        parser.error(f"the GCS URL is needed (${GCS_URL_ENV} or --gcs-url)")
    # the token comes in the environment (not argv, which any user can read); taken out
    # of it so that the workers this daemon starts do not inherit it
    token = os.environ.pop(auth.TOKEN_ENV, None) or None
    if args.rpc_port is not None and token is None and not args.disable_auth:
        parser.error(f"a cluster node needs ${auth.TOKEN_ENV} (or --disable-auth)")
    if args.die_with_parent:
        die_with_parent()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    daemon = NodeDaemon(
        session_dir=args.session_dir,
        gcs_url=args.gcs_url,
        node_id=args.node_id,
        resources=json.loads(args.resources),
        object_store_memory=args.object_store_memory,
        labels=json.loads(args.labels),
        rpc_port=args.rpc_port,
        rpc_host=args.rpc_host,
        head=args.head,
        auth_token=None if args.disable_auth else token,
        join_gcs=(join_gcs_url or args.gcs_url, args.join_gcs_tls),
        join_gcs_replica=json.loads(replica_plans) if replica_plans else None,
        membership_monitor=args.membership_monitor,
        adopt_store_of=args.adopt_store_of,
    )
    # The daemon makes and drops many small objects per task and call, almost none in
    # cycles: collecting the young generation every 700 allocations cost ~10% of its
    # CPU under load. What exists at start is never collected again.
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    # this process serves one log: the first it reaches, or the one an earlier daemon of
    # this node saw; a GCS wiped, replaced or put back from an older copy is refused
    fencing.remember(args.session_dir / fencing.IDENTITY_FILE)
    try:
        asyncio.run(daemon.serve())
    except GcsIdentityError as error:  # refused before it served (a daemon started anew)
        logging.getLogger("cairn.node").error("node daemon %s: %s", args.node_id, error)
        daemon.refused = error
    finally:
        fencing.flush()
    if daemon.refused is not None:
        fencing.record_refusal(args.session_dir, daemon.refused)
        sys.exit(fencing.GCS_REFUSED_EXIT)


if __name__ == "__main__":
    main()
