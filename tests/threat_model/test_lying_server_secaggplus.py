"""Adversary: a lying aggregator with colluding sites, against one site in SecAgg+ (k-regular).

SecAgg+ masks each site only with its neighbours, so a server that can make a victim's few
neighbours act on its lies can strip the victim's masks. These attacks were found by an
independent review (issue 6): (a) one survivor list per neighbourhood, (b) routing the
victim's masking through partners that are later declared dropped, (c) steering the graph by
choosing round ids. Each test plays the attack to the end with the adversary of
``secaggplus_adversary.py`` and checks the victim's input is never recovered, plus attacks of the
same classes that no issue listed (cutting off an arc, splitting the key directory, hiding the
victim from the checks).
"""

from __future__ import annotations

import numpy as np
import pytest

from secagg.errors import AbortReason, ConfigurationError, InvalidMessage
from secagg.masking import RoundConfig, make_roster
from secagg.masking.graph import colluders as colluder_count
from secagg.masking.messages import KeyDirectory, MaskAttestation, ShareDelivery, SurvivorList
from secagg.roster import Roster, RosterSigner, SignedRoster
from tests.threat_model.secaggplus_adversary import Adversary

N = 40


def _setup(colluding: int, *, n: int = N, neighbors: object = "auto", victim: int = 1,
           **kwargs: object) -> Adversary:
    roster, identities = make_roster(n)
    config = RoundConfig("secaggplus", roster, 8, neighbors=neighbors, **kwargs)  # type: ignore[arg-type]
    rng = np.random.default_rng(n)
    inputs = {s: (rng.uniform(-1, 1, 8), float(rng.uniform(0.2, 1.0))) for s in config.sites}
    return Adversary(config, identities, inputs, _closest(config, victim, colluding))


def _closest(config: RoundConfig, victim: int, count: int) -> frozenset[int]:
    """The worst case: the colluders are the victim's nearest sites on the ring."""
    ring, i = config.ring, config.ring.index(victim)
    order = [ring[(i + d * sign) % len(ring)] for d in range(1, len(ring)) for sign in (1, -1)]
    picked: list[int] = []
    for s in order:
        if s not in picked and s != victim:
            picked.append(s)
    return frozenset(picked[:count])


def test_split_view_survivor_lists_cannot_unmask_a_site() -> None:
    """(a) The victim is shown a list where it survives, its honest neighbours one where it
    dropped; colluders sign both. Neighbourhood-only counting let both pass (n=40, k=4, 7
    colluders). The issue's parameters are now refused, and with the ones the bound accepts no
    split of the honest sites gives both lists a roster-wide quorum."""
    roster, _ = make_roster(N)
    with pytest.raises(ConfigurationError, match="bound"):
        RoundConfig("r", roster, 8, neighbors=4)
    victim = 1
    for shown_alive in (14, 17, 20):  # how many honest sites the server shows list 1
        adv = _setup(7, victim=victim)
        assert not adv.config.complete_graph
        adv.keys_and_shares()
        alive = sorted(adv.masked)
        without = [s for s in alive if s != victim]
        hood = adv.config.neighbourhood(victim)
        # the victim's honest neighbours must see list 2 to reveal its key shares
        honest = sorted(adv.honest, key=lambda s: (s in hood and s != victim, s))
        group1 = [victim, *[s for s in honest if s != victim][: shown_alive - 1]]
        group2 = [s for s in honest if s not in group1]
        for s in group1:
            adv.show(s, alive)
        for s in group2:
            adv.show(s, without)
        adv.collude_sign(alive)
        adv.collude_sign(without)
        for s in group1:
            adv.request_unmask(s, alive)
        for s in group2:
            adv.request_unmask(s, without)
        assert not adv.exposed(victim), shown_alive
        # at most one of the lists reached the quorum, so one group revealed nothing at all
        q = adv.config.consistency_quorum
        assert min(len(adv.signatures.get(tuple(alive), {})),
                   len(adv.signatures.get(tuple(without), {}))) < q
        refused = [s for s in adv.honest if adv.aborts.get(s) is not None
                   and adv.aborts[s].reason is AbortReason.TOO_FEW_SURVIVORS]
        assert refused


def test_partner_route_through_dropped_partners_cannot_unmask_a_site() -> None:
    """(b) The server delivers the victim shares only from partners it will later declare
    dropped (and from colluders), so that the victim's masks can be stripped with the
    partners' reconstructed keys while the victim counts as alive."""
    victim = 1
    adv = _setup(2, victim=victim)
    config = adv.config
    hood = config.neighbourhood(victim)
    t = config.reconstruction_threshold
    # the route: the victim gets shares from t - 1 neighbours only
    keep = sorted(adv.colluders) + [s for s in sorted(hood) if s != victim
                                    and s not in adv.colluders][: t - 1 - len(adv.colluders)]
    adv.keys_and_shares(withhold={victim: [s for s in hood if s not in keep]})
    assert victim in adv.aborts  # too many neighbours missing: it never masks or uploads
    assert adv.aborts[victim].reason is AbortReason.TOO_MANY_MISSING_NEIGHBOURS
    assert not adv.exposed(victim)

    # the widest route the victim accepts, then its honest partners are declared dropped and
    # the victim is kept out of the consistency check (so it cannot object)
    adv = _setup(2, victim=victim)
    config = adv.config
    m = config.max_missing_per_side
    assert m is not None
    left, right = config.windows(victim)
    withheld = []
    for window in (left, right):
        honest = sorted(s for s in window if s not in adv.colluders)
        withheld += honest[: m]  # the victim tolerates m missing per side
    adv.keys_and_shares(withhold={victim: withheld})
    assert victim in adv.masked
    partners = adv.delivered[victim]
    survivors = [s for s in adv.masked if s not in partners - adv.colluders]
    for s in adv.honest:
        if s != victim and s in survivors:
            adv.show(s, survivors)
    adv.collude_sign(survivors)
    for s in adv.honest:
        if s != victim:
            adv.request_unmask(s, survivors)
    assert not adv.exposed(victim)
    # dropping every honest partner costs more sites than the quorum allows, or leaves gaps
    reasons = {a.reason for a in adv.aborts.values()}
    assert reasons & {AbortReason.TOO_FEW_SURVIVORS, AbortReason.TOO_MANY_MISSING_NEIGHBOURS,
                      AbortReason.MASK_PARTNERS_INCOMPLETE}
    assert not adv.responses


def test_hiding_the_victim_from_the_checks_does_not_let_its_under_masked_input_be_opened() -> None:
    """The victim masks with fewer partners than its live neighbours (shares withheld); the
    server never shows it the survivor list, so only its neighbours can notice: they check the
    victim's signed mask attestation before revealing its self-mask shares."""
    victim = 1
    adv = _setup(0, victim=victim)
    m = adv.config.max_missing_per_side
    assert m is not None
    left, right = adv.config.windows(victim)
    withheld = sorted(left)[:m] + sorted(right)[:m]
    adv.keys_and_shares(withhold={victim: withheld})
    alive = sorted(adv.masked)  # nobody dropped: the withheld partners are alive
    for s in alive:
        if s != victim:
            adv.show(s, alive)
    blamed = [s for s, a in adv.aborts.items()
              if a.reason is AbortReason.MASK_PARTNERS_INCOMPLETE]
    assert set(blamed) >= (adv.config.neighbourhood(victim) - {victim})


def test_server_cannot_steer_the_graph_with_round_ids() -> None:
    """(c) The graph was a function of round parameters the server chooses: 200 round ids gave
    200 neighbourhoods of one site. Now it comes from the seed the roster signer drew."""
    signer = RosterSigner.generate()
    _, identities = make_roster(N)
    signed = signer.sign({s: k.public_bytes for s, k in identities.items()})
    roster = signed.open(signer.public_key)
    seen = {RoundConfig(f"round-{i}", roster, 8 + i % 3, neighbors="auto").neighbourhood(1)
            for i in range(200)}
    assert len(seen) == 1
    # the seed cannot be swapped without breaking the trust root's signature
    forged = SignedRoster(Roster(dict(roster), bytes(32)), signed.signature)
    with pytest.raises(InvalidMessage):
        forged.open(signer.public_key)


def test_random_colluders_never_reach_a_threshold_or_fill_a_window_at_the_auto_parameters(
) -> None:
    """(c) Without steering, 7 random colluders of 40 exposed some site in 40% of rounds at
    k=4 and in every round at k=10: t > (k+1)(1+gamma)/2 applied the global fraction to each
    neighbourhood. The parameters the bound picks make both bad events impossible here."""
    roster, _ = make_roster(N)
    config = RoundConfig("r", roster, 8, neighbors="auto")
    k, t = config.graph.neighbors, config.reconstruction_threshold
    m = config.max_missing_per_side
    assert m is not None
    rng = np.random.default_rng(3)
    corrupt = colluder_count(N, config.corrupt_fraction)
    assert corrupt == 8  # floor(0.2 * 40): more than the 7 of the review
    for trial in range(300):
        seeded = Roster(dict(roster), rng.bytes(32))
        c = RoundConfig("r", seeded, 8, neighbors=k)
        bad = set(rng.choice(c.sites, size=corrupt, replace=False).tolist())
        for s in c.sites:
            assert len((c.neighbourhood(s) - {s}) & bad) < t, trial
            for window in c.windows(s):
                assert len(window & bad) < k // 2 - m, trial


def test_cutting_off_an_arc_by_claiming_its_neighbours_dropped_is_refused() -> None:
    """Declaring k/2 consecutive sites dropped on both sides of an arc would leave the arc's
    masks cancelling among themselves: the server would learn the arc's sum. Every site checks
    that no survivor misses more than m neighbours on one side, for the whole list."""
    adv = _setup(0, n=100, corrupt_fraction=0.05, dropout_rate=0.05)
    config = adv.config
    adv.keys_and_shares()
    half = config.graph.neighbors // 2
    ring = config.ring
    arc = set(ring[half: 2 * half])
    cut = set(ring[:half]) | set(ring[2 * half: 3 * half])
    survivors = [s for s in adv.masked if s not in cut]
    assert arc <= set(survivors) and len(survivors) >= config.consistency_quorum
    for s in survivors:
        adv.show(s, survivors)
    assert all(adv.aborts[s].reason is AbortReason.TOO_MANY_MISSING_NEIGHBOURS
               for s in survivors)
    assert not adv.signatures


def test_split_key_directory_gives_a_site_another_session_and_nothing_verifies() -> None:
    """Showing one site a directory without a far-away site (whose keys it never checks)
    changes its session id, which every share, attestation and survivor-list signature is
    bound to: nothing the others send it verifies, and it reveals nothing."""
    adv = _setup(0)
    for s, c in adv.clients.items():
        adv.advertised[s] = c.start()
    victim = 1
    far = next(s for s in adv.config.sites if s not in adv.config.neighbourhood(victim))
    full = KeyDirectory(tuple(adv.advertised[s] for s in adv.config.sites))
    from secagg.masking import _common

    adv.session = _common.session_id(adv.config.params_digest, full.entries)
    partial = KeyDirectory(tuple(e for e in full.entries if e.site_id != far))
    for s in adv.config.sites:
        reply = adv._send(s, partial if s == victim else full)
        if reply is not None:
            adv.share_keys[s] = reply  # type: ignore[assignment]
    for v in adv.config.sites:
        delivery = ShareDelivery({u: sk.encrypted_shares[v] for u, sk in adv.share_keys.items()
                                  if v in sk.encrypted_shares})
        adv.delivered[v] = set(delivery.encrypted_shares)
        reply = adv._send(v, delivery)
        if reply is not None:
            adv.masked[v] = reply  # type: ignore[assignment]
    alive = sorted(adv.masked)
    for s in alive:
        adv.show(s, alive)
    adv.request_unmask(victim, alive)
    assert victim not in adv.responses
    assert adv.aborts[victim].reason is AbortReason.SHARE_AUTHENTICATION_FAILED


def test_forged_or_missing_mask_attestation_aborts_the_consistency_check() -> None:
    adv = _setup(0)
    adv.keys_and_shares()
    alive = sorted(adv.masked)
    site = alive[0]
    listing = adv.survivor_list(alive)
    peer = sorted((adv.config.neighbourhood(site) - {site}) & set(alive))[0]
    forged = dict(listing.attestations)
    att = forged[peer]
    forged[peer] = MaskAttestation(att.partners, att.payload_digest, bytes(64))
    from dataclasses import replace

    assert adv._send(site, replace(listing, attestations=forged)) is None
    assert adv.aborts[site].reason is AbortReason.BAD_SIGNATURE
    site2 = alive[1]
    listing2 = adv.survivor_list(alive)
    missing = dict(listing2.attestations)
    missing.pop(next(iter(sorted((adv.config.neighbourhood(site2) - {site2}) & set(alive)))))
    assert adv._send(site2, replace(listing2, attestations=missing)) is None
    assert adv.aborts[site2].reason is AbortReason.MASK_PARTNERS_INCOMPLETE


def test_server_padding_a_mask_attestations_partner_list_is_refused() -> None:
    """The server withholds one neighbour's shares from the victim (so the victim does not mask
    with it), then forwards the victim's attestation with that neighbour added to its partners,
    so the neighbours' check "it masked with every live neighbour" passes.
    Property: the padded attestation fails its signature; every neighbour aborts."""
    victim = 1
    adv = _setup(0, victim=victim)
    left, _ = adv.config.windows(victim)
    skipped = sorted(left)[0]
    adv.keys_and_shares(withhold={victim: [skipped]})
    alive = sorted(adv.masked)
    assert victim in alive and skipped in alive
    listing = adv.survivor_list(alive)
    genuine = listing.attestations[victim]
    assert skipped not in genuine.partners
    padded = MaskAttestation(tuple(sorted({*genuine.partners, skipped})),
                             genuine.payload_digest, genuine.signature)
    forged = SurvivorList(listing.survivors, {**listing.attestations, victim: padded})
    neighbours = sorted(adv.config.neighbourhood(victim) - {victim})
    for s in neighbours:
        assert adv._send(s, forged) is None
    assert {adv.aborts[s].reason for s in neighbours} == {AbortReason.BAD_SIGNATURE}


def test_directory_missing_too_many_neighbours_on_one_side_is_refused() -> None:
    """m + 1 sites on one side of the victim never appear in its key directory (withheld, or
    dropped): its secrets would go to too few neighbours on that side, and its masked input
    could not be safely summed. Property: it aborts (TOO_MANY_MISSING_NEIGHBOURS) before
    sharing anything; with m missing it goes on."""
    victim = 1
    for missing, refused in ((0, False), (1, True)):
        adv = _setup(0, victim=victim)
        m = adv.config.max_missing_per_side
        assert m is not None
        left, _ = adv.config.windows(victim)
        absent = set(sorted(left)[: m + missing])
        entries = tuple(c.start() for s, c in adv.clients.items() if s not in absent)
        reply = adv._send(victim, KeyDirectory(entries))
        if refused:
            assert reply is None
            assert adv.aborts[victim].reason is AbortReason.TOO_MANY_MISSING_NEIGHBOURS
        else:
            assert reply is not None


def test_survivor_list_missing_one_more_than_m_neighbours_of_a_site_is_refused() -> None:
    """The server claims m + 1 consecutive sites dropped next to one survivor (each check
    alone looks small: it is one more than the rule allows), and shows the list to a site far
    from them. Property: the far site checks the whole list and aborts."""
    adv = _setup(0)
    config = adv.config
    m = config.max_missing_per_side
    assert m is not None
    adv.keys_and_shares()
    ring = config.ring
    gap = set(ring[1: m + 2])  # m + 1 sites just after ring[0]
    survivors = [s for s in adv.masked if s not in gap]
    assert len(survivors) >= config.consistency_quorum
    far = next(s for s in survivors if not config.neighbourhood(s) & (gap | {ring[0]}))
    adv.show(far, survivors)
    assert far in adv.aborts, "the far site signed a list with a gap"
    assert adv.aborts[far].reason is AbortReason.TOO_MANY_MISSING_NEIGHBOURS
    assert not adv.signatures


def test_client_refuses_to_sign_a_survivor_list_below_the_roster_quorum() -> None:
    """With a generous dropout tolerance (m = 8 of 17 per side) the server spreads its claimed
    dropouts so that no window misses more than m, but the list keeps only q - 1 sites.
    Property: a site refuses to sign (TOO_FEW_SURVIVORS): fewer than a quorum is never the
    round's list."""
    adv = _setup(0, dropout_rate=0.2)
    config = adv.config
    q = config.consistency_quorum
    adv.keys_and_shares()
    ring = config.ring
    n = len(ring)
    dropped = {ring[(i * n) // (n - q + 1)] for i in range(n - q + 1)}
    survivors = frozenset(s for s in adv.masked if s not in dropped)
    assert len(survivors) == q - 1
    _, worst = config.worst_missing_window(survivors)
    assert config.max_missing_per_side is not None and worst <= config.max_missing_per_side
    site = min(survivors)
    adv.show(site, survivors)
    assert site in adv.aborts, "the site signed a list below the quorum"
    assert adv.aborts[site].reason is AbortReason.TOO_FEW_SURVIVORS
