"""A site's own input provider failing is the site's error, not the server's."""

from __future__ import annotations

import numpy as np
import pytest

from secagg.errors import PreconditionError, ProtocolAbort
from secagg.masking import MaskingClient
from secagg.masking.messages import Stage
from tests.roundkit import Round


def _failing(error: Exception) -> object:
    def provider() -> tuple[np.ndarray, float]:
        raise error
    return provider


@pytest.mark.parametrize("error", [ZeroDivisionError("division by zero"), KeyError("weight"),
                                   ValueError("bad update")])
def test_an_input_provider_error_reaches_the_caller_as_itself(error: Exception) -> None:
    r = Round(sites=4, vector_length=8)
    r.clients[1] = MaskingClient(r.config, 1, r.identities[1], _failing(error))  # type: ignore[arg-type]
    r.advance()
    r.advance()
    client = r.clients[1]
    with pytest.raises(type(error)) as raised:
        client.handle(r.outgoing[1])
    assert raised.value is error
    assert not isinstance(raised.value, ProtocolAbort)  # the server is not blamed
    # the round is over for this site: nothing secret stays for a retry to use
    assert client._self_mask_seed == b""
    assert not client._held_shares
    # and the client says so: handed the same delivery again, it was told that no share
    # opened (blaming the peers for its own input); now a precondition, its stage ABORTED
    assert client.stage is Stage.ABORTED
    with pytest.raises(PreconditionError):
        client.handle(r.outgoing[1])
