"""Test support code shared by the test tiers (the control-plane runner lives here)."""
