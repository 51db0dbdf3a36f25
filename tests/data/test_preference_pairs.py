"""identity_preference_pairs: one pair per bundled question, new identity chosen, old one rejected."""

from twinkle.data import identity_preference_pairs, load_self_cognition_raw


def test_pairs_put_new_name_in_chosen_and_old_in_rejected():
    pairs = identity_preference_pairs("Sparkle", "the Sparkle team", "Twinkle", "the Twinkle team")
    assert len(pairs) == len(load_self_cognition_raw())
    assert set(pairs[0]) == {"prompt", "chosen", "rejected"}
    assert any("Sparkle" in p["chosen"] for p in pairs)
    assert all("Sparkle" not in p["rejected"] for p in pairs)
    assert any("Twinkle" in p["rejected"] for p in pairs)
    assert all(p["chosen"] != p["rejected"] for p in pairs if "{" not in p["prompt"])
