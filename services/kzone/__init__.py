"""K-Zone live voice and dance analysis and reference content."""
