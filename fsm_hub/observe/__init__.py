"""What a person sees: tables, the diagram, status, the live tail, the timeline, announcements."""
