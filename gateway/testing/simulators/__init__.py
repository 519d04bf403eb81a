"""Simulated peers for tests and demos: PACS, modality (and later HL7 and XDS endpoints).

They are product code: a site uses them to test its own gateway configuration, from pytest
(the medgate plugin's fixtures) or from the shell (`gateway simulate ...`).
"""
