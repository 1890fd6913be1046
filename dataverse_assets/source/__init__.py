"""Where change sets come from: the Web API client (auth, client, query, key_ranges) and one
file per source behind one base class (base): live Dataverse, the built-in simulator, saved
fixtures, and the archive replayed."""
