"""Device side: CuTe DSL code of the persistent pre-amble kernel. Imported only by megapre.host.build."""
