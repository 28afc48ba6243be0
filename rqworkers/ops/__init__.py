"""Operations: status, dead letters, metrics, checks, the keeper and its status page."""
