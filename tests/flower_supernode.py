"""``flower-supernode`` as the deployment tests start it: Flower's own, polling more often when idle.

Flower 1.42's SuperNode sleeps a fixed 3 s whenever a poll of the SuperLink finds no
message (and 0.5 s while its ClientApp works), so each message of a test deployment waited
up to 3 s on a sleeping node. Here the node sleeps at most ``POLL_SECONDS``; everything else
is Flower's. Run as ``python flower_supernode.py ARGS``, ARGS as ``flower-supernode`` takes.
"""

import sys
import time
import types

from flwr.supernode import start_client_internal
from flwr.supernode.cli import flower_supernode

POLL_SECONDS = 0.1

start_client_internal.time = types.SimpleNamespace(**{**vars(time),
                                                       "sleep": lambda seconds: time.sleep(min(seconds, POLL_SECONDS))})

if __name__ == "__main__":
    sys.argv[0] = "flower-supernode"
    sys.exit(flower_supernode())
