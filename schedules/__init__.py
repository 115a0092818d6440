"""Celery beat schedules and the periodic tasks they fire (none configured yet)."""
