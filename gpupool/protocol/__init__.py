"""Wire-level code shared by the agent, the coordinator and the client: topics, payload codecs, errors."""
