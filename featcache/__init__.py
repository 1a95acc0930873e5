"""featcache."""
