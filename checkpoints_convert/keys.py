"""The declarative HF <-> jmoe key tables live in ``jmoe.hf_keys`` (``jmoe.load`` reads HF
folders through them); re-exported here for the converter's users."""

from jmoe.hf_keys import RULES, Rule, hf_config_from, llada2_rules, olmoe_rules, rules_for

__all__ = ["RULES", "Rule", "hf_config_from", "llada2_rules", "olmoe_rules", "rules_for"]
