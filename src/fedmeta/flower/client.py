"""fedmeta's ClientApps: ``client_app``, and ``secure_client_app`` for ``flower.secagg = true``.

Each message is answered by ``fedmeta.flower.node``, imported when the first message
needs it. A SuperNode starts one ClientApp process per message, and three of SecAgg+'s
four stages a round (setup, share keys, unmask) are answered by Flower's ``secaggplus_mod``
alone: loading this module imports Flower but not torch, so those stages cost a Flower
import in place of a torch one.
"""

from __future__ import annotations

from types import ModuleType

from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

client_app = ClientApp()
secure_client_app = ClientApp(mods=[secaggplus_mod])
"""The ClientApp of ``flower.secagg = true``: Flower's SecAgg+ mod masks what ``train_securely`` returns."""


def _node() -> ModuleType:
    from fedmeta.flower import node

    return node


@secure_client_app.query()
@client_app.query()
def describe(message: Message, context: Context) -> Message:
    """Tells the server which clients this node holds, and the experiment's initial model."""
    return _node().describe(message, context)


@client_app.train()
def train(message: Message, context: Context) -> Message:
    """Each named client's update for the round's stage, from the server weights: its delta and metrics."""
    return _node().train(message, context)


@secure_client_app.evaluate()
@client_app.evaluate()
def personalize(message: Message, context: Context) -> Message:
    """Each named client's initial accuracy, then after each fine-tuning epoch on its train split."""
    return _node().personalize(message, context)


@secure_client_app.train()
def train_securely(message: Message, context: Context) -> Message:
    """The node's part of the round's secure sum, which the SecAgg+ mod masks before it leaves the node."""
    return _node().train_securely(message, context)
