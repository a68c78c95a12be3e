"""The SDK hospital sites embed (gRPC client, torch adapters, integrations). Later issue."""
