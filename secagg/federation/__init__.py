"""Setting up a federation: TLS material (:mod:`.pki`), the config file (:mod:`.config`) and the
parties' directories (:mod:`.kit`). No network, no database."""

from secagg.federation.config import FederationConfig
from secagg.federation.kit import (
    SignedRequest,
    SiteKit,
    init_federation,
    make_site_request,
    pin_trust_root,
    sign_request,
    sign_site_request,
)

__all__ = ["FederationConfig", "SignedRequest", "SiteKit", "init_federation",
           "make_site_request", "pin_trust_root", "sign_request", "sign_site_request"]
